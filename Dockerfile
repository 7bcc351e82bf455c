# Postlane in a container: Debian slim, a non-root user, the config and the state on volumes.
# Build:  docker build -t postlane .
# First run (writes the config, keys, certificate and token into the volumes):
#   docker run --rm -v postlane-etc:/etc/postlane -v postlane-var:/var/lib/postlane postlane \
#       init /etc/postlane --state-dir /var/lib/postlane --hostname mta.example --domain insurer.example --ip ...
# Serve:  docker run -d --network host -v postlane-etc:/etc/postlane -v postlane-var:/var/lib/postlane postlane
# (host networking: the pools send from the machine's dedicated IPs). docs/operations.md.

FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# src/postlane/data/insurance.toml links to the case study in examples/
COPY examples ./examples
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
RUN groupadd --system --gid 10025 postlane \
    && useradd --system --uid 10025 --gid postlane --home-dir /var/lib/postlane --shell /usr/sbin/nologin postlane \
    && mkdir -p /etc/postlane /var/lib/postlane \
    && chown postlane:postlane /etc/postlane /var/lib/postlane \
    && chmod 0700 /etc/postlane /var/lib/postlane
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# numeric, so that runtimes checking runAsNonRoot can tell (uid 10025 is the postlane user)
USER 10025:10025
WORKDIR /var/lib/postlane
VOLUME ["/etc/postlane", "/var/lib/postlane"]
# 25: bounces, DMARC reports, complaints; 587: submission (Docker lets containers bind low ports)
EXPOSE 25 587
STOPSIGNAL SIGTERM
# healthy = the node answers on its API (loopback, with the token from the config)
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["postlane", "status", "-c", "/etc/postlane/postlane.toml", "--json"]
ENTRYPOINT ["postlane"]
CMD ["serve", "-c", "/etc/postlane/postlane.toml"]
