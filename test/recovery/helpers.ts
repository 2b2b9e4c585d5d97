/** What the recovery tests share. */

/**
 * config.yaml of a cloud appliance named "cloud" with one recovery plan, "app", whose root disk
 * is `volume`: a production subnet with a fixed IP, and an isolated drill subnet. The subnets and
 * security groups are those the AWS emulator starts with.
 */
export function cloudConfig(volume: string): string {
  return `appliance:
  name: cloud
recovery:
  app:
    instanceType: t3.small
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    privateIp: 10.0.1.30
    rootVolume: { volume: ${volume}, device: /dev/xvda }
    tags: { Role: app }
    drill: { subnet: subnet-0a1b2c3d4e5f60002, securityGroups: [sg-0d1e2f3a] }
`;
}
