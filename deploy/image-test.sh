#!/usr/bin/env bash
# Build every CYPHONIC image on a local Debian base and start each one for real.
#
#   deploy/image-test.sh            (root; `make image-test`)
#
# No container registry is reachable here, so the base image is made with
# `debootstrap --variant=minbase bookworm` and imported into podman; the images are built on
# it through the Dockerfile's BASE_IMAGE argument. That local base also carries the host's CA
# bundle (pip and uv inside the build need it here); the published Dockerfile does not.
#
# Each service container runs as its non-root user in a network namespace of its own
# (--network none: loopback only), binds UDP 443 thanks to the namespaced sysctl
# net.ipv4.ip_unprivileged_port_start, reaches the host's PostgreSQL through its Unix socket
# and the host's Redis through a Unix-socket bridge, and must answer /readyz (its own
# HEALTHCHECK). The agent image must bring up a TUN device with NET_ADMIN and /dev/net/tun,
# and must fail to without NET_ADMIN.
#
# Environment: KEEP_BASE=1 reuses an existing base image (default), REBUILD_BASE=1 makes it
# again; SERVICES="as nms trs" picks which services are started.
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"
BASE=localhost/cyphonic-base:bookworm
TAG=image-test
SERVICES=${SERVICES:-"as nms trs"}
PG_SOCKET_DIR=${PG_SOCKET_DIR:-/var/run/postgresql}
REDIS_ADDR=${REDIS_ADDR:-127.0.0.1:6379}
DB=cyphonic_image_test
T0=$(date +%s)

say() { printf '[image-test %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (podman, debootstrap)"

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v socat >/dev/null || need+=(socat)
command -v psql >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -S "$PG_SOCKET_DIR/.s.PGSQL.5432" ] || die "PostgreSQL socket $PG_SOCKET_DIR/.s.PGSQL.5432 missing"
redis-cli -h "${REDIS_ADDR%:*}" -p "${REDIS_ADDR#*:}" ping >/dev/null 2>&1 \
    || die "Redis at $REDIS_ADDR does not answer"

WORK=$(mktemp -d /tmp/cyphonic-image-test.XXXXXX)
SOCAT_PID=""
cleanup() {
    local rc=$?
    for c in $SERVICES; do podman rm -f -t 2 "cyimg-$c" >/dev/null 2>&1 || true; done
    [ -n "$SOCAT_PID" ] && kill "$SOCAT_PID" 2>/dev/null || true
    psql -h "$PG_SOCKET_DIR" -U postgres -qc "DROP DATABASE IF EXISTS $DB" postgres >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

# ------------------------------------------------------------------ base image
if [ "${REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
    say "debootstrap minbase bookworm"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    rootfs="$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    # Local-test only: the host's CA bundle, so pip and uv inside builds trust this network.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV UV_NATIVE_TLS=1' \
        --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
    say "base image $BASE: $(podman image inspect --format '{{.Size}}' "$BASE" | numfmt --to=iec)"
else
    say "reusing base image $BASE (REBUILD_BASE=1 to make it again)"
fi

# ------------------------------------------------------------------ images
for target in as nms trs agent; do
    say "building cyphonic-$target"
    podman build -q --format docker --network host -f deploy/images/Dockerfile \
        --build-arg "BASE_IMAGE=$BASE" --target "$target" -t "localhost/cyphonic-$target:$TAG" . \
        >"$WORK/build-$target.log" 2>&1 || { tail -30 "$WORK/build-$target.log"; die "build $target"; }
    say "cyphonic-$target: $(podman image inspect --format '{{.Size}}' "localhost/cyphonic-$target:$TAG" | numfmt --to=iec)"
done
# No compilers, caches or uv in the final layers.
for target in as agent; do
    podman run --rm --no-healthcheck --network none --entrypoint sh "localhost/cyphonic-$target:$TAG" -c \
        'for x in gcc cc uv pip; do command -v $x >/dev/null && { echo "found $x"; exit 1; }; done; \
         [ ! -d /root/.cache ] || { echo "found /root/.cache"; exit 1; }' \
        || die "cyphonic-$target carries build tools"
done

# ------------------------------------------------------------------ agent: TUN device
say "agent: TUN device with NET_ADMIN and /dev/net/tun"
out=$(podman run --rm --no-healthcheck --network none --cap-drop ALL --cap-add NET_ADMIN --device /dev/net/tun \
        -v "$PWD/deploy/images/test/tun_check.py:/tun_check.py:ro" --entrypoint python3 \
        "localhost/cyphonic-agent:$TAG" /tun_check.py) || die "agent TUN: $out"
say "agent: $out"
if out=$(podman run --rm --no-healthcheck --network none --cap-drop ALL --device /dev/net/tun \
        -v "$PWD/deploy/images/test/tun_check.py:/tun_check.py:ro" --entrypoint python3 \
        "localhost/cyphonic-agent:$TAG" /tun_check.py); then
    die "agent made a TUN device without NET_ADMIN: $out"
fi
say "agent without NET_ADMIN refused as expected: $out"

# ------------------------------------------------------------------ shared state for services
psql -h "$PG_SOCKET_DIR" -U postgres -qc "DROP DATABASE IF EXISTS $DB" postgres >/dev/null 2>&1
psql -h "$PG_SOCKET_DIR" -U postgres -qc "CREATE DATABASE $DB" postgres >/dev/null
mkdir -p "$WORK/redis" "$WORK/pki" "$WORK/admin"
socat "UNIX-LISTEN:$WORK/redis/redis.sock,fork,mode=666" "TCP:$REDIS_ADDR" &
SOCAT_PID=$!
head -c 36 /dev/urandom | base64 | tr -d '/+=' >"$WORK/admin/admin-token"
chown -R 10001:10001 "$WORK/pki" "$WORK/admin"
chmod 0400 "$WORK/admin/admin-token"
RELAY_SECRET=$(head -c 32 /dev/urandom | base64 | tr -d '/+=')
DATABASE_URL="postgresql+asyncpg://postgres@/$DB?host=/run/postgresql"
REDIS_URL="unix:///run/redis/redis.sock?db=15"

say "init-pki and migrate (AS image)"
podman run --rm --no-healthcheck --network none -v "$WORK/pki:/pki" "localhost/cyphonic-as:$TAG" \
    init-pki --pki-dir /pki --domain cyphonic.internal >/dev/null
podman run --rm --no-healthcheck --network none -v "$PG_SOCKET_DIR:/run/postgresql" \
    -e CYPHONIC_DATABASE_URL="$DATABASE_URL" "localhost/cyphonic-as:$TAG" migrate \
    >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log"; die "migrate"; }

declare -A HTTP_PORT=([as]=8081 [nms]=8082 [trs]=8083)
for svc in $SERVICES; do
    say "starting $svc"
    podman run -d --name "cyimg-$svc" --network none \
        --sysctl net.ipv4.ip_unprivileged_port_start=443 \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
        -v "$PG_SOCKET_DIR:/run/postgresql" -v "$WORK/redis:/run/redis" \
        -v "$WORK/pki:/etc/cyphonic/pki:ro" -v "$WORK/admin:/etc/cyphonic/admin:ro" \
        -e CYPHONIC_ENVIRONMENT=production \
        -e CYPHONIC_DATABASE_URL="$DATABASE_URL" -e CYPHONIC_REDIS_URL="$REDIS_URL" \
        -e CYPHONIC_PKI_DIR=/etc/cyphonic/pki \
        -e CYPHONIC_ADMIN_TOKEN_FILE=/etc/cyphonic/admin/admin-token \
        -e CYPHONIC_RELAY_TOKEN_SECRET="$RELAY_SECRET" \
        -e CYPHONIC_QUIC_PORT=443 \
        "localhost/cyphonic-$svc:$TAG" serve >/dev/null 2>"$WORK/run-$svc.log" \
        || { cat "$WORK/run-$svc.log"; die "start $svc"; }
    # Without systemd podman cannot schedule health checks by itself (it says so on
    # stderr); this script runs them with `podman healthcheck run` instead.
done

failed=()
for svc in $SERVICES; do
    ready=0
    for _ in $(seq 1 60); do
        if [ "$(podman inspect --format '{{.State.Running}}' "cyimg-$svc")" != true ]; then
            break
        fi
        if podman healthcheck run "cyimg-$svc" >/dev/null 2>&1; then ready=1; break; fi
        sleep 1
    done
    if [ $ready = 1 ]; then
        uid=$(podman exec "cyimg-$svc" awk '/^Uid:/ {print $2}' /proc/1/status)
        body=$(podman exec "cyimg-$svc" python3 -c \
            "import urllib.request,os;print(urllib.request.urlopen('http://127.0.0.1:${HTTP_PORT[$svc]}/readyz').read().decode())")
        # 01BB = 443 in /proc/net/udp{,6}: the QUIC socket is bound.
        udp443=$(podman exec "cyimg-$svc" sh -c 'cat /proc/net/udp /proc/net/udp6 | awk "\$2 ~ /:01BB\$/" | wc -l')
        say "$svc ready: uid=$uid udp443_sockets=$udp443 /readyz=$body"
        [ "$uid" = 10001 ] || failed+=("$svc:uid=$uid")
        [ "$udp443" -ge 1 ] || failed+=("$svc:no-udp-443")
    else
        say "$svc NOT ready; last log lines:"
        podman logs --tail 25 "cyimg-$svc" 2>&1 | sed 's/^/    /'
        failed+=("$svc")
    fi
done
[ ${#failed[@]} -eq 0 ] || die "not ready: ${failed[*]}"
say "all images built; services ready: $SERVICES; agent TUN ok; total $(( $(date +%s) - T0 ))s"
