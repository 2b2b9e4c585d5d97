# Tandem appliance image: `appliance daemon` as a non-root user.
# Build:  docker build -t tandem .
# Run:    docker run -v tandem-home:/var/lib/tandem -p 7443:7443 tandem
# Volumes to protect are passed in as devices (--device /dev/sdb:/dev/sdb:r) or bind mounts.

# --- build: install every dependency, compile TypeScript to dist/ --------------------------
FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts
COPY . .
RUN npm run build && npm prune --omit=dev

# --- runtime: compiled JavaScript and production dependencies only ----------------------------
# bookworm (glibc), not alpine: the BLAKE3 binding shipped is the linux-x64-gnu build.
FROM node:20-bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends util-linux lvm2 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system tandem && useradd --system --gid tandem --home /var/lib/tandem tandem \
    && mkdir -p /var/lib/tandem && chown tandem:tandem /var/lib/tandem
WORKDIR /opt/tandem
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY --from=build /src/bin ./bin
RUN ln -s /opt/tandem/bin/appliance /usr/local/bin/appliance
USER tandem
ENV TANDEM_HOME=/var/lib/tandem NODE_ENV=production
VOLUME ["/var/lib/tandem"]
EXPOSE 7443
# The health route needs no token; -k because the certificate is self-signed (peers pin it by fingerprint).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD node -e "require('https').get('https://127.0.0.1:7443/v1/health',{rejectUnauthorized:false},r=>process.exit(r.statusCode===200?0:1)).on('error',()=>process.exit(1))"
# First start: initialize the home if needed, then run the daemon (serve + scheduler).
ENTRYPOINT ["/bin/sh", "-c", "[ -f \"$TANDEM_HOME/appliance.json\" ] || appliance init --name \"${TANDEM_NAME:-$(hostname)}\"; exec appliance daemon --listen 0.0.0.0:7443 \"$@\"", "--"]
