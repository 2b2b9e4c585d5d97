/**
 * A tiny XML writer for EC2 Query API answers: values are escaped, `undefined` members are left
 * out, arrays become `<item>` lists (the EC2 convention), nested objects become elements.
 */
export type XmlValue = string | number | boolean | undefined | null | XmlObject | XmlValue[];
export interface XmlObject {
  [name: string]: XmlValue;
}

export function escapeXml(s: string): string {
  return s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

export function toXml(name: string, v: XmlValue): string {
  if (v === undefined || v === null) return '';
  if (Array.isArray(v)) return `<${name}>${v.map((item) => toXml('item', item)).join('')}</${name}>`;
  if (typeof v === 'object') return `<${name}>${Object.entries(v).map(([k, x]) => toXml(k, x)).join('')}</${name}>`;
  return `<${name}>${escapeXml(String(v))}</${name}>`;
}

/** EC2's namespace for API version 2016-11-15, the version every current SDK sends. */
export const EC2_XMLNS = 'http://ec2.amazonaws.com/doc/2016-11-15/';

export function ec2Response(action: string, requestId: string, body: XmlObject): string {
  const inner = Object.entries(body).map(([k, x]) => toXml(k, x)).join('');
  return `<?xml version="1.0" encoding="UTF-8"?>\n<${action}Response xmlns="${EC2_XMLNS}"><requestId>${requestId}</requestId>${inner}</${action}Response>`;
}

export function ec2ErrorXml(code: string, message: string, requestId: string): string {
  return `<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>${escapeXml(code)}</Code><Message>${escapeXml(message)}</Message></Error></Errors><RequestID>${requestId}</RequestID></Response>`;
}
