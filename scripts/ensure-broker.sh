#!/usr/bin/env bash
# Make sure a RabbitMQ broker is reachable for conejo's tests and demo, and
# export AMQP_URL pointing at it.
#
#   source scripts/ensure-broker.sh   # exports AMQP_URL (and PATH) into this shell
#   scripts/ensure-broker.sh          # checks/starts the broker; prints an
#                                     # `export AMQP_URL=...` line on stdout, so
#                                     # `eval "$(scripts/ensure-broker.sh)"` works
#
# Logic:
#   * AMQP_URL set:   its host:port must accept TCP connections, else this fails
#                     (the URL is only ever printed with its password redacted).
#   * AMQP_URL unset: use amqp://guest:guest@127.0.0.1:5672/%2f. If nothing
#                     listens there, install Debian's rabbitmq-server when it is
#                     missing (apt-get, needs root or sudo), start it with
#                     `rabbitmq-server -detached` and wait until it accepts
#                     connections.
#
# A broker that is already running is never stopped or reconfigured. Progress
# goes to stderr, prefixed "ensure-broker:". Knob: ENSURE_BROKER_TIMEOUT
# (seconds to wait for a freshly started broker, default 90).
#
# When sourced, the caller's shell options are left as they were; the work runs
# in a subshell under `set -euo pipefail`.

_eb_default_url='amqp://guest:guest@127.0.0.1:5672/%2f'

_eb_log() { printf 'ensure-broker: %s\n' "$*" >&2; }

# The URL with the password of its userinfo (if any) replaced by ***.
_eb_redact() {
    local re='^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):[^@/]*@(.*)$'
    if [[ $1 =~ $re ]]; then
        printf '%s:***@%s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    else
        printf '%s' "$1"
    fi
}

# Parse amqp[s]://[user[:pass]@]host[:port][/vhost][?query] into _eb_host and
# _eb_port. Returns non-zero for something that is not such a URL.
_eb_parse() {
    local url=$1 scheme rest hostport
    [[ $url == *://* ]] || return 1
    scheme=${url%%://*}
    rest=${url#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest%%#*}
    hostport=${rest##*@}
    case ${scheme,,} in
        amqp) _eb_port=5672 ;;
        amqps) _eb_port=5671 ;;
        *) return 1 ;;
    esac
    if [[ $hostport == \[* ]]; then
        # IPv6 literal: [::1]:5672
        _eb_host=${hostport#\[}
        _eb_host=${_eb_host%%\]*}
        rest=${hostport#*\]}
        if [[ $rest == :?* ]]; then _eb_port=${rest#:}; fi
    else
        _eb_host=${hostport%%:*}
        if [[ $hostport == *:?* ]]; then _eb_port=${hostport##*:}; fi
    fi
    # An empty host means localhost in the AMQP URI spec.
    [[ -n $_eb_host ]] || _eb_host=localhost
    [[ $_eb_port =~ ^[0-9]{1,5}$ ]] && ((10#$_eb_port > 0 && 10#$_eb_port < 65536))
}

# Does host:port accept a TCP connection within 2 seconds?
_eb_tcp_ok() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c ': <"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

_eb_is_loopback() {
    case $1 in
        localhost | 127.* | ::1 | 0:0:0:0:0:0:0:1) return 0 ;;
        *) return 1 ;;
    esac
}

# Debian installs rabbitmqctl in /usr/sbin, which a non-login PATH may lack.
_eb_fix_path() {
    local d
    command -v rabbitmqctl >/dev/null 2>&1 && return 0
    for d in /usr/sbin /sbin /usr/local/sbin; do
        if [[ -x $d/rabbitmqctl ]]; then
            PATH="$PATH:$d"
            export PATH
            return 0
        fi
    done
    return 0
}

# Root runs commands directly; anyone else goes through sudo if there is one.
_eb_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _eb_log "ERROR: need root (or sudo) to run: $*"
        return 1
    fi
}

# The integration tests look at the broker side with `rabbitmqctl`; say early
# when that cannot work. Never fatal.
_eb_check_ctl() {
    local host=$1
    if ! command -v rabbitmqctl >/dev/null 2>&1; then
        _eb_log "warning: rabbitmqctl not found; tests that inspect the broker with rabbitmqctl will fail"
        return 0
    fi
    if ! _eb_is_loopback "$host"; then
        _eb_log "warning: broker host '$host' is not local; rabbitmqctl talks to the local node, not to it"
        return 0
    fi
    if ! timeout 30 rabbitmqctl -q await_startup --timeout 20 >/dev/null 2>&1; then
        _eb_log "warning: 'rabbitmqctl await_startup' failed (not root/rabbitmq, or the broker on 127.0.0.1 is not this machine's rabbitmq node?); tests that use rabbitmqctl may fail"
    fi
    return 0
}

_eb_install() {
    local status rc=0 made_policy=0
    if ! command -v apt-get >/dev/null 2>&1; then
        _eb_log "ERROR: rabbitmq-server is not installed and apt-get is unavailable; install RabbitMQ or set AMQP_URL"
        return 1
    fi
    _eb_log "rabbitmq-server not installed; installing it with apt-get"
    _eb_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2 ||
        _eb_log "warning: apt-get update failed; trying the install anyway"

    # Keep the package's postinst from starting the service itself (through
    # invoke-rc.d and an init script that may wait up to 10 minutes): this
    # script starts and configures the broker below. Only a policy file this
    # script created is removed again.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        if printf '#!/bin/sh\n# temporary, from conejo scripts/ensure-broker.sh\nexit 101\n' |
            _eb_as_root tee /usr/sbin/policy-rc.d >/dev/null &&
            _eb_as_root chmod 755 /usr/sbin/policy-rc.d; then
            made_policy=1
        fi
    fi
    _eb_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        rabbitmq-server </dev/null >&2 || rc=$?
    if ((made_policy)); then
        _eb_as_root rm -f /usr/sbin/policy-rc.d || true
    fi
    if ((rc != 0)); then
        _eb_log "warning: apt-get install exited with $rc (a postinst that cannot start services is expected without systemd); checking the result"
    fi

    status=$(dpkg-query -W -f='${db:Status-Abbrev}' rabbitmq-server 2>/dev/null || true)
    _eb_fix_path
    if [[ ! -x /usr/sbin/rabbitmq-server ]] && ! command -v rabbitmq-server >/dev/null 2>&1; then
        _eb_log "ERROR: rabbitmq-server is still not installed (dpkg status '${status:-none}')"
        return 1
    fi
    if [[ $status != ii* ]]; then
        _eb_log "warning: rabbitmq-server dpkg status is '${status}', not 'ii'; trying to start it anyway"
    fi

    # A fresh install names the node rabbit@<hostname> and listens on every
    # interface. Pin a test broker to loopback and a node name that resolves
    # everywhere, unless someone already chose a node name.
    local conf=/etc/rabbitmq/rabbitmq-env.conf
    if ! grep -Eqs '^[[:space:]]*(export[[:space:]]+)?(RABBITMQ_)?NODENAME=' "$conf"; then
        _eb_log "configuring a loopback-only node rabbit@localhost in $conf"
        _eb_as_root mkdir -p /etc/rabbitmq
        printf '%s\n' \
            '# added by conejo scripts/ensure-broker.sh: loopback-only test broker' \
            'NODENAME=rabbit@localhost' \
            'NODE_IP_ADDRESS=127.0.0.1' \
            'export ERL_EPMD_ADDRESS=127.0.0.1' \
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' |
            _eb_as_root tee -a "$conf" >/dev/null
    fi
}

# The "Slogan" (reason) of an Erlang crash dump written at or after epoch
# second $1, if there is one: a node that died while booting leaves one.
_eb_crash_reason() {
    local dump=/var/lib/rabbitmq/erl_crash.dump mtime
    [[ -r $dump ]] || return 1
    mtime=$(stat -c %Y "$dump" 2>/dev/null) || return 1
    ((mtime >= $1)) || return 1
    sed -n 's/^Slogan: //p' "$dump" | head -n 1 | cut -c1-400
}

# Print the tail of the broker's logs, for a start that did not work.
_eb_dump_logs() {
    local f newest=''
    for f in /var/log/rabbitmq/*.log; do
        if [[ -f $f && (-z $newest || $f -nt $newest) ]]; then newest=$f; fi
    done
    for f in /var/log/rabbitmq/startup_err "$newest"; do
        if [[ -s $f ]]; then
            _eb_log "last lines of $f:"
            tail -n 25 "$f" >&2 || true
        fi
    done
}

# `rabbitmq-server -detached`, with no descriptor of ours left open in the
# daemon: one inherited pipe (a caller's `$(...)`, a CI log reader) would keep
# that reader waiting for an end of file that never comes.
_eb_launch_detached() {
    local out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/ensure-broker.XXXXXX")
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
                eval "exec $fd>&-" 2>/dev/null || true
            fi
        done
        _eb_as_root rabbitmq-server -detached </dev/null >"$out" 2>&1
    ) || rc=$?
    if [[ -s $out ]]; then sed 's/^/  rabbitmq-server: /' "$out" >&2 || true; fi
    rm -f "$out"
    ((rc == 0)) || _eb_log "warning: rabbitmq-server -detached exited with $rc"
}

_eb_start_and_wait() {
    local limit=${ENSURE_BROKER_TIMEOUT:-90} start=$SECONDS deadline epoch reason
    [[ $limit =~ ^[0-9]+$ ]] || limit=90
    deadline=$((start + limit))
    epoch=$(date +%s)

    if timeout 10 rabbitmqctl -q ping >/dev/null 2>&1; then
        # The node is up but not (yet) listening: it is still booting.
        _eb_log "a rabbitmq node is already running; waiting for it to accept AMQP connections"
    else
        _eb_log "starting rabbitmq-server -detached"
        _eb_launch_detached
    fi

    _eb_log "waiting up to ${limit}s for 127.0.0.1:5672"
    until _eb_tcp_ok 127.0.0.1 5672; do
        if reason=$(_eb_crash_reason "$epoch"); then
            _eb_log "ERROR: the RabbitMQ node crashed while starting: $reason"
            _eb_log "(see /var/lib/rabbitmq/erl_crash.dump; \`rabbitmq-server\` without -detached shows the boot in the foreground)"
            _eb_dump_logs
            return 1
        fi
        if ((SECONDS >= deadline)); then
            _eb_log "ERROR: RabbitMQ did not accept connections on 127.0.0.1:5672 within ${limit}s"
            _eb_dump_logs
            return 1
        fi
        sleep 1
    done
    # Port open means the broker is about done booting; make sure of it.
    timeout 40 rabbitmqctl -q await_startup --timeout 30 >/dev/null 2>&1 ||
        _eb_log "warning: rabbitmqctl await_startup did not confirm the boot"
    _eb_log "RabbitMQ is up on 127.0.0.1:5672 (after $((SECONDS - start))s)"
}

# Does the work; writes the URL to use into the file $1.
_eb_main() {
    local url=${AMQP_URL:-} out=$1
    _eb_host='' _eb_port=''
    _eb_fix_path

    if [[ -n $url ]]; then
        if ! _eb_parse "$url"; then
            _eb_log "ERROR: AMQP_URL is not an amqp:// or amqps:// URL with a valid port: $(_eb_redact "$url")"
            return 2
        fi
        if _eb_tcp_ok "$_eb_host" "$_eb_port"; then
            _eb_log "broker reachable at $_eb_host:$_eb_port (AMQP_URL=$(_eb_redact "$url"))"
            _eb_check_ctl "$_eb_host"
            printf '%s' "$url" >"$out"
            return 0
        fi
        _eb_log "ERROR: AMQP_URL is set ($(_eb_redact "$url")) but nothing accepts connections at $_eb_host:$_eb_port."
        _eb_log "Start that broker, or unset AMQP_URL to use (and if needed install and start) a local RabbitMQ on 127.0.0.1:5672."
        return 1
    fi

    url=$_eb_default_url
    if _eb_tcp_ok 127.0.0.1 5672; then
        _eb_log "broker already running at 127.0.0.1:5672"
        _eb_check_ctl 127.0.0.1
        printf '%s' "$url" >"$out"
        return 0
    fi

    _eb_log "nothing listens on 127.0.0.1:5672"
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [[ ! -x /usr/sbin/rabbitmq-server ]]; then
        _eb_install
    fi
    _eb_fix_path
    _eb_start_and_wait
    _eb_check_ctl 127.0.0.1
    printf '%s' "$url" >"$out"
}

_eb_cleanup_names() {
    unset -f _eb_log _eb_redact _eb_parse _eb_tcp_ok _eb_is_loopback _eb_fix_path \
        _eb_as_root _eb_check_ctl _eb_install _eb_crash_reason _eb_dump_logs _eb_launch_detached \
        _eb_start_and_wait \
        _eb_main _eb_cleanup_names
    unset _eb_default_url _eb_host _eb_port _eb_url _eb_out _eb_rc _eb_saved_opts
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    # Sourced: run under strict mode in a subshell, keep the caller's options.
    _eb_saved_opts=$(set +o)
    # $(...) does not see errexit, so `set +o` above always says it is off.
    case $- in *e*) _eb_saved_opts+=$'\nset -e' ;; esac
    set +e
    _eb_out=$(mktemp "${TMPDIR:-/tmp}/ensure-broker.XXXXXX") &&
        (
            set -euo pipefail
            _eb_main "$_eb_out"
        ) >&2
    _eb_rc=$?
    _eb_url=$(cat "$_eb_out" 2>/dev/null)
    rm -f "$_eb_out"
    eval "$_eb_saved_opts"
    _eb_fix_path # in this shell too, for a rabbitmqctl installed just now
    if ((_eb_rc == 0)); then
        export AMQP_URL="$_eb_url"
    fi
    # eval expands $_eb_rc before the cleanup unsets it (and leaves the
    # caller's positional parameters alone).
    eval "_eb_cleanup_names; return $_eb_rc"
fi

set -euo pipefail
_eb_out=$(mktemp "${TMPDIR:-/tmp}/ensure-broker.XXXXXX")
trap 'rm -f "$_eb_out"' EXIT
_eb_main "$_eb_out" >&2
_eb_url=$(cat "$_eb_out")
export AMQP_URL="$_eb_url"
printf 'export AMQP_URL=%q\n' "$AMQP_URL"
