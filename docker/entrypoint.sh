#!/bin/sh
# The image's entrypoint: a private CUDA MPS control daemon for the workers, then nginx.
#
#   ENTRYPOINT ["ngx-gpu-entrypoint"]  CMD ["nginx"]    (docker/Dockerfile)
#
# When the command is nginx serving (not `nginx -t`, `-V`, `-s ...`, nor any other
# program: those are exec'd as they are), this script, PID 1 in the container:
#   1. unless NGX_GPU_MPS=off, starts `nvidia-cuda-mps-control -d` with its pipe and log
#      directories under /run/ngx-gpu/mps (CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY,
#      exported so that nginx's `env` lines hand them to the workers), as the workers' user;
#   2. runs nginx in the foreground (the config says `daemon off;`) as its child, forwarding
#      signals: SIGQUIT and SIGTERM become SIGQUIT (nginx's graceful shutdown: docker stop
#      sends the image's STOPSIGNAL, SIGQUIT; Kubernetes sends SIGTERM), SIGINT becomes
#      SIGTERM (fast shutdown), SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH pass as they are
#      (reload, reopen logs, binary upgrade);
#   3. when nginx exits, stops the daemon (`echo quit | nvidia-cuda-mps-control`) and exits
#      with nginx's status.
#
# NGX_GPU_MPS: auto (the default) starts MPS where there is a GPU and the MPS binary, and
# otherwise says in one line why not and goes on without; on makes any failure to start it
# fatal (status 1, before nginx starts); off never starts it.
# NGX_GPU_MPS_USER: the user the daemon runs as; it must be the user nginx's workers run as
# (the `user` directive: nginx in the image's config). Default: nginx when the entrypoint
# runs as root and that user exists, else the entrypoint's own user.
#
# Why the daemon runs as the workers' user: the control daemon starts one MPS server per
# user id, as the user of the first client that connects, and a client of another user
# waits until that server has no clients left. A daemon started by an unprivileged user can
# only start servers as itself. So the workers' user owns the daemon, its server and both
# directories (mode 0700: no other user in the container reaches the daemon), and nothing
# of MPS runs as root. nginx's master never initialises CUDA (kernels are compiled with
# NVRTC alone), so it never becomes a client.
#
# The functions are also sourced, not copied, by t/gpu/mps.sh (the GPU machine's check):
# with NGX_GPU_ENTRYPOINT_LIB=1 set, sourcing this file defines them and runs nothing.

# Both overridable for tests only (t/entrypoint/test.sh): where the directories go, and the
# device node whose absence means "no GPU".
NGX_GPU_MPS_DIR=${NGX_GPU_MPS_DIR:-/run/ngx-gpu/mps}
NGX_GPU_MPS_DEVICE=${NGX_GPU_MPS_DEVICE:-/dev/nvidiactl}
ngx_mps_started=

ngx_say() { echo "ngx-gpu-entrypoint: $*" >&2; }

# As the daemon's user: runs "$@" as $ngx_mps_user (setpriv, from util-linux) when that is
# not the current user.
ngx_as_mps_user() {
    if [ "$ngx_mps_user" = "$(id -un)" ]; then
        "$@"
    else
        setpriv --reuid="$ngx_mps_user" --regid="$(id -g "$ngx_mps_user")" --init-groups -- "$@"
    fi
}

# Why MPS cannot start here, or nothing when it can.
ngx_mps_missing() {
    if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        echo "no nvidia-cuda-mps-control on PATH (the NVIDIA Container Toolkit mounts it with the compute capability)"
    elif [ ! -e "$NGX_GPU_MPS_DEVICE" ]; then
        echo "no GPU in this container (no $NGX_GPU_MPS_DEVICE)"
    fi
}

# Starts the control daemon and sets ngx_mps_started; returns non-zero when it could not,
# with the reason in ngx_mps_why. NGX_GPU_MPS decides what that costs (ngx_mps_start).
ngx_mps_try_start() {
    mode=${NGX_GPU_MPS:-auto}
    case $mode in
        off) return 0 ;;
        on | auto) ;;
        *) ngx_mps_why="NGX_GPU_MPS must be on, off or auto, not '$mode'"; return 2 ;;
    esac
    ngx_mps_why=$(ngx_mps_missing)
    [ -z "$ngx_mps_why" ] || return 1
    if [ -n "${NGX_GPU_MPS_USER:-}" ]; then
        ngx_mps_user=$NGX_GPU_MPS_USER
    elif [ "$(id -u)" = 0 ] && id nginx >/dev/null 2>&1; then
        ngx_mps_user=nginx
    else
        ngx_mps_user=$(id -un)
    fi
    if ! id "$ngx_mps_user" >/dev/null 2>&1; then
        ngx_mps_why="no user '$ngx_mps_user' (NGX_GPU_MPS_USER)"
        return 1
    fi
    if [ "$ngx_mps_user" != "$(id -un)" ] && [ "$(id -u)" != 0 ]; then
        ngx_mps_why="only root can start it as '$ngx_mps_user'"
        return 1
    fi
    export CUDA_MPS_PIPE_DIRECTORY="$NGX_GPU_MPS_DIR/pipe"
    export CUDA_MPS_LOG_DIRECTORY="$NGX_GPU_MPS_DIR/log"
    # Fresh directories every start: a stale pipe from a killed daemon would be taken for a
    # live one.
    rm -rf "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if ! (umask 022 && mkdir -p "$NGX_GPU_MPS_DIR") \
        || ! mkdir -m 0700 "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" \
        || ! chown "$ngx_mps_user:$(id -g "$ngx_mps_user")" \
            "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"; then
        ngx_mps_why="cannot make $NGX_GPU_MPS_DIR/{pipe,log} for '$ngx_mps_user'"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        return 1
    fi
    if ! ngx_as_mps_user nvidia-cuda-mps-control -d; then
        ngx_mps_why="nvidia-cuda-mps-control -d failed (log: $CUDA_MPS_LOG_DIRECTORY)"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        return 1
    fi
    # The daemon answers once its control pipe is up (get_server_list exits 0 only when it
    # reached a daemon); one that died at once never does: given up after 5 s.
    i=0
    while ! echo get_server_list | ngx_as_mps_user nvidia-cuda-mps-control >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 50 ]; then
            ngx_mps_why="the daemon does not answer (log: $CUDA_MPS_LOG_DIRECTORY/control.log)"
            echo quit | ngx_as_mps_user nvidia-cuda-mps-control >/dev/null 2>&1
            unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
            return 1
        fi
        sleep 0.1
    done
    ngx_mps_started=1
    ngx_say "MPS: control daemon started as '$ngx_mps_user' (pipe $CUDA_MPS_PIPE_DIRECTORY, log $CUDA_MPS_LOG_DIRECTORY)"
    return 0
}

# Starts MPS as NGX_GPU_MPS says, and says in one line what came of it; returns non-zero
# only when nginx must not start.
ngx_mps_start() {
    ngx_mps_why=
    ngx_mps_try_start
    rc=$?
    if [ "$rc" = 0 ]; then
        [ -n "$ngx_mps_started" ] || ngx_say "MPS: off (NGX_GPU_MPS=off)"
        return 0
    fi
    if [ "$rc" = 2 ]; then
        ngx_say "$ngx_mps_why"
        return 1
    fi
    if [ "${NGX_GPU_MPS:-auto}" = on ]; then
        ngx_say "MPS: not started: $ngx_mps_why; NGX_GPU_MPS=on: not starting nginx"
        return 1
    fi
    ngx_say "MPS: not started: $ngx_mps_why; going on without it (NGX_GPU_MPS=off: no attempt)"
    return 0
}

# Stops the daemon (it stops its server once the server's clients are gone).
ngx_mps_stop() {
    [ -n "$ngx_mps_started" ] || return 0
    ngx_mps_started=
    if echo quit | ngx_as_mps_user nvidia-cuda-mps-control >/dev/null 2>&1; then
        ngx_say "MPS: control daemon stopped"
    else
        ngx_say "MPS: the control daemon did not take 'quit'"
    fi
}

# Does "$@" run nginx as a server (and so needs MPS and signal forwarding)?
ngx_serves() {
    case $1 in nginx | */nginx) ;; *) return 1 ;; esac
    shift
    for a in "$@"; do
        case $a in -t | -T | -v | -V | -h | -\? | -s | -q*) return 1 ;; esac
    done
    return 0
}

ngx_forward() {
    ngx_signalled=1
    [ -n "$ngx_child" ] && kill "-$1" "$ngx_child" 2>/dev/null
}

ngx_main() {
    if ! ngx_serves "$@"; then
        exec "$@"
    fi
    ngx_child=
    ngx_signalled=
    trap 'ngx_forward QUIT' QUIT TERM
    trap 'ngx_forward TERM' INT
    trap 'ngx_forward HUP' HUP
    trap 'ngx_forward USR1' USR1
    trap 'ngx_forward USR2' USR2
    trap 'ngx_forward WINCH' WINCH
    ngx_mps_start || exit 1
    if [ -n "$ngx_signalled" ]; then # told to stop while MPS was starting
        ngx_mps_stop
        exit 0
    fi
    "$@" &
    ngx_child=$!
    # wait returns early (above 128) when a trapped signal arrives: then wait again, until
    # the return is nginx's own exit. Should nginx exit just as a signal comes, the next
    # wait finds no child (127): its status is the one already seen.
    status=
    while :; do
        ngx_signalled=
        wait "$ngx_child"
        rc=$?
        if [ -z "$ngx_signalled" ]; then
            status=$rc
            break
        fi
        if [ "$rc" = 127 ] && ! kill -0 "$ngx_child" 2>/dev/null; then
            status=${status:-$rc}
            break
        fi
        status=$rc
    done
    ngx_mps_stop
    exit "$status"
}

if [ "${NGX_GPU_ENTRYPOINT_LIB:-}" != 1 ]; then
    ngx_main "$@"
fi
