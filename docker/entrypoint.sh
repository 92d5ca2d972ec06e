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

# Where the cgroup tree is mounted (tests point this at a stand-in tree).
cgroup_root=${KERNELPOOL_CGROUP_MOUNT:-/sys/fs/cgroup}

# True when this process sits at the root of every cgroup hierarchy it is in, which is what a
# private cgroup namespace (--cgroupns=private) shows. Then a cgroup mount made here exposes the
# container's own subtree only; with the host's namespace it would expose the host's whole tree.
private_cgroupns() {
    ! grep -qv ':/$' "$1"
}

# "MOUNT_POINT CONTROLLERS" for each read-only cgroup v1 mount under $1 that holds memory, cpu,
# cpuacct or pids, from /proc/self/mounts lines on stdin. CONTROLLERS are the hierarchy's
# subsystems as listed in $2 (/proc/cgroups), comma-separated: "cpu,cpuacct" for a combined mount.
v1_readonly_mounts() {
    awk -v root="$1" -v subsystems="$2" '
        BEGIN {
            while ((getline line < subsystems) > 0)
                if (line !~ /^#/) { split(line, f, /[ \t]+/); known[f[1]] = 1 }
        }
        $3 == "cgroup" && ($2 == root || index($2, root "/") == 1) {
            n = split($4, opts, ","); ro = 0; wanted = 0; ctrls = ""
            for (i = 1; i <= n; i++) {
                if (opts[i] == "ro") ro = 1
                else if (opts[i] in known) {
                    ctrls = ctrls (ctrls == "" ? "" : ",") opts[i]
                    if (opts[i] ~ /^(memory|cpu|cpuacct|pids)$/) wanted = 1
                }
            }
            if (ro && wanted) print $2, ctrls
        }'
}

remount_v2() {
    # A read-only cgroup2 mount can be remounted read-write in place.
    if mount -o remount,rw "$cgroup_root" 2>/dev/null; then
        echo "kernelpool-entrypoint: remounted $cgroup_root read-write" >&2
    else
        echo "kernelpool-entrypoint: $cgroup_root is read-only and could not be remounted" \
             "(needs --cgroupns=private and --cap-add SYS_ADMIN; see docs/deployment.md)" >&2
    fi
}

remount_v1() {
    # A v1 controller mount cannot be remounted read-write in place ("mount point is busy"):
    # unmount it and mount the hierarchy afresh, which in a private cgroup namespace shows the
    # container's own subtree as its root.
    mounts=$(v1_readonly_mounts "$cgroup_root" /proc/cgroups < /proc/self/mounts)
    [ -n "$mounts" ] || return 0
    echo "$mounts" | while read -r point ctrls; do
        if umount "$point" 2>/dev/null && mount -t cgroup -o "nosuid,nodev,noexec,$ctrls" cgroup "$point" 2>/dev/null; then
            echo "kernelpool-entrypoint: mounted cgroup v1 $ctrls read-write at $point" >&2
        else
            echo "kernelpool-entrypoint: cgroup v1 $ctrls at $point is read-only and could not be" \
                 "mounted read-write (needs --cgroupns=private and --cap-add SYS_ADMIN; see docs/deployment.md)" >&2
        fi
    done
}

writable_cgroup() {
    # Docker mounts the cgroup tree read-only. With --cgroupns=private and CAP_SYS_ADMIN the
    # container may make its own (namespaced) subtree writable; the sandbox then creates
    # kernels' cgroups below it. Without those, `kernelpool doctor` and the server say why.
    [ "${KERNELPOOL_REMOUNT_CGROUP:-1}" = 1 ] || return 0
    [ "$(id -u)" = 0 ] || return 0
    v2=$(awk -v root="$cgroup_root" '$2 == root && $3 == "cgroup2" && $4 ~ /(^|,)ro(,|$)/' /proc/self/mounts)
    v1=$(v1_readonly_mounts "$cgroup_root" /proc/cgroups < /proc/self/mounts)
    [ -n "$v2$v1" ] || return 0
    if ! private_cgroupns /proc/self/cgroup; then
        echo "kernelpool-entrypoint: the cgroup tree is read-only and this container shares the host's" \
             "cgroup namespace: not making it writable (needs --cgroupns=private; see docs/deployment.md)" >&2
        return 0
    fi
    if [ -n "$v2" ]; then
        remount_v2
    else
        remount_v1
    fi
}

# Sourced by the tests, which call the functions above on stand-in trees.
[ "${KERNELPOOL_ENTRYPOINT_SOURCED:-0}" = 1 ] && return 0

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
