# Postlane in a container: Debian slim, a non-root user, the config and the state on volumes.
# Build:  docker build -t postlane .
# First run (writes the config, keys, certificate and token into the volumes):
#   docker run --rm -v postlane-etc:/etc/postlane -v postlane-var:/var/lib/postlane postlane \
#       init /etc/postlane --state-dir /var/lib/postlane --hostname mta.example --domain insurer.example --ip ...
# Serve:  docker run -d --network host --stop-timeout 45 -v postlane-etc:/etc/postlane -v postlane-var:/var/lib/postlane postlane
# (--stop-timeout: `docker stop` SIGKILLs after 10 s otherwise, while the drain takes up to
# node.drain_timeout, 30 s; 45 as the systemd unit's TimeoutStopSec and compose's grace period)
# (host networking: the pools send from the machine's dedicated IPs). On the host's network a
# non-root process may not bind ports below net.ipv4.ip_unprivileged_port_start (1024), so the
# node's interpreter carries the one capability it needs, CAP_NET_BIND_SERVICE (below): leave it
# in the container's set (Docker's default; with --cap-drop ALL add --cap-add NET_BIND_SERVICE)
# and do not run with --security-opt no-new-privileges, which ignores file capabilities.
# docs/operations.md.

FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# src/postlane/data/insurance.toml links to the case study in examples/, data/deploy/ to deploy/
COPY examples ./examples
COPY deploy ./deploy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
# libcap2-bin: setcap below (getcap to check it); unpinned: a security update replaces the version
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10025 postlane \
    && useradd --system --uid 10025 --gid postlane --home-dir /var/lib/postlane --shell /usr/sbin/nologin postlane \
    && mkdir -p /etc/postlane /var/lib/postlane \
    && chown postlane:postlane /etc/postlane /var/lib/postlane \
    && chmod 0700 /etc/postlane /var/lib/postlane
COPY --from=build /wheels /wheels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The node runs on its own interpreter: a copy of the image's python3.X in a virtualenv (python
# and python3 link to it), allowed to bind ports 25 and 587 as uid 10025 (cap_net_bind_service, a
# file capability); the image's /usr/local/bin/python stays without it.
RUN python -m venv --copies /opt/postlane \
    && py="$(python -c 'import sys; print("python%d.%d" % sys.version_info[:2])')" \
    && ln -sf "$py" /opt/postlane/bin/python \
    && ln -sf "$py" /opt/postlane/bin/python3 \
    && /opt/postlane/bin/python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && setcap cap_net_bind_service=+ep "/opt/postlane/bin/$py" \
    && getcap "/opt/postlane/bin/$py" | grep -q cap_net_bind_service
ENV PATH=/opt/postlane/bin:$PATH
# numeric, so that runtimes checking runAsNonRoot can tell (uid 10025 is the postlane user)
USER 10025:10025
WORKDIR /var/lib/postlane
VOLUME ["/etc/postlane", "/var/lib/postlane"]
# 25: bounces, DMARC reports, complaints; 587: submission (bound thanks to the capability above)
EXPOSE 25 587
STOPSIGNAL SIGTERM
# healthy = the node answers on its API (loopback, with the token from the config)
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["postlane", "status", "-c", "/etc/postlane/postlane.toml", "--json"]
ENTRYPOINT ["postlane"]
CMD ["serve", "-c", "/etc/postlane/postlane.toml"]
