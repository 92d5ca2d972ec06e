#!/bin/sh
# The image's entry point (run by tini, PID 1). Prepares the data folder, makes the cgroup
# hierarchy writable where the container was given the means, then execs kernelpool, so that
# SIGTERM from `docker stop` reaches the server itself and it shuts kernels down gracefully.
#
#   (no arguments) or `serve [OPTIONS]`   kernelpool serve [OPTIONS]
#   `-...`                                kernelpool serve -...
#   `users add alice`, `doctor`, ...      kernelpool users add alice, ...
#   anything else                         run as given (e.g. `sh`)
set -eu

data=${KERNELPOOL_DATA_DIR:-/data}
export KERNELPOOL_DATA_DIR="$data"

prepare_data() {
    # root's state lives here; kernels (other uids) only need to traverse to users/NAME
    mkdir -p "$data/users"
    chown root:root "$data" "$data/users" 2>/dev/null || true
    chmod 711 "$data" "$data/users"
}

writable_cgroup() {
    # Docker mounts the cgroup2 tree read-only. With --cgroupns=private and CAP_SYS_ADMIN the
    # container may remount its own (namespaced) subtree read-write; the sandbox then creates
    # kernels' cgroups below it. Without those, `kernelpool doctor` and the server say why.
    [ "${KERNELPOOL_REMOUNT_CGROUP:-1}" = 1 ] || return 0
    [ "$(id -u)" = 0 ] || return 0
    grep -qs ' /sys/fs/cgroup cgroup2 ro[, ]' /proc/self/mounts || return 0
    if mount -o remount,rw /sys/fs/cgroup 2>/dev/null; then
        echo "kernelpool-entrypoint: remounted /sys/fs/cgroup read-write" >&2
    else
        echo "kernelpool-entrypoint: /sys/fs/cgroup is read-only and could not be remounted" \
             "(needs --cgroupns=private and --cap-add SYS_ADMIN; see docs/deployment.md)" >&2
    fi
}

if [ "$#" -eq 0 ]; then
    set -- serve
fi
case "$1" in
    -*) set -- serve "$@" ;;
esac
case "$1" in
    serve)
        prepare_data
        writable_cgroup
        exec kernelpool "$@"
        ;;
    users|tokens|audit|doctor)
        exec kernelpool "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
