#!/bin/sh
# weightctl without a daemon: exit 2 and a usage line for every usage error,
# exit 1 and UNAVAILABLE where no daemon listens.  Output is TAP.
#
#   test-weightctl-usage.sh PATH-TO-WEIGHTCTL
set -u

weightctl=$1
scratch=$(mktemp -d "${TMPDIR:-/tmp}/weightctl-usage.XXXXXX") || exit 99
trap 'rm -rf "$scratch"' EXIT
# No daemon here: a path nothing is bound to.
WEIGHTD_SOCKET=$scratch/nothing/weightd.sock
export WEIGHTD_SOCKET

n=0
failed=0

ok() {
        n=$((n + 1))
        echo "ok $n - $1"
}

not_ok() {
        n=$((n + 1))
        failed=1
        echo "not ok $n - $1"
        sed 's/^/# /' "$scratch/out" "$scratch/err"
}

# expect CODE PATTERN DESCRIPTION -- ARGS...: the exit status is CODE and
# stderr matches the grep pattern PATTERN (empty: anything).
expect() {
        code=$1 pattern=$2 what=$3
        shift 4
        "$weightctl" "$@" >"$scratch/out" 2>"$scratch/err" </dev/null
        rc=$?
        if [ "$rc" -ne "$code" ]; then
                echo "# exit status $rc, expected $code" >>"$scratch/err"
                not_ok "$what"
        elif [ -n "$pattern" ] && ! grep -q -- "$pattern" "$scratch/err"; then
                echo "# stderr does not match '$pattern'" >>"$scratch/err"
                not_ok "$what"
        else
                ok "$what"
        fi
}

expect 2 "^Usage: weightctl" "no command" --
expect 2 "unknown command 'frobnicate'" "unknown command" -- frobnicate
expect 2 "unknown option '--bogus'" "unknown long option" -- --bogus ls
expect 2 "unknown option '-x'" "unknown short option" -- ls -x
expect 2 "needs an argument" "--socket without its argument" -- ls --socket
expect 2 "needs an argument" "--component without its argument" -- tensors /m --component
expect 2 "needs a MODEL" "prefetch without MODEL" -- prefetch
expect 2 "needs a MODEL" "tensors without MODEL" -- tensors --json
expect 2 "needs a MODEL" "evict without MODEL" -- evict
expect 2 "needs a MODEL" "components without MODEL" -- components --json
expect 2 "takes no --component" "components --component" -- components /m --component vae
expect 2 "unexpected argument" "components with two MODELs" -- components /a /b
expect 2 "must not be empty" "empty MODEL" -- pin ""
expect 2 "takes no MODEL" "ls with an argument" -- ls /m
expect 2 "unexpected argument" "two MODELs" -- unpin /a /b
expect 2 "takes no --component" "status --component" -- status --component x
expect 2 "takes one --component" "tensors with two components" -- tensors /m -c a -c b
expect 2 "needs --tensor" "cat without --tensor" -- cat /m
expect 2 "has no --json" "cat --json" -- cat /m --tensor t --json
expect 2 "takes no --tensor" "ls --tensor" -- ls --tensor t
expect 2 "needs a path" "empty --socket" -- --socket "" status
expect 2 "RANK/WORLD with 1 <= WORLD" "--shard without a slash" -- prefetch /m --shard 3
expect 2 "RANK/WORLD with 1 <= WORLD" "--shard with world 0" -- prefetch /m --shard 0/0
expect 2 "RANK/WORLD with 1 <= WORLD" "--shard with a sign" -- prefetch /m --shard -1/2
expect 2 "RANK/WORLD with 1 <= WORLD" "--shard over the world limit" -- prefetch /m --shard 0/65537
expect 2 "must be below the world" "--shard rank 2/2" -- prefetch /m --shard 2/2
expect 2 "PATTERN:DIM with DIM 0 or 1" "--rule with dim 2" -- prefetch /m --shard 0/2 --rule 'x:2'
expect 2 "PATTERN:DIM with DIM 0 or 1" "--rule without a dim" -- prefetch /m --shard 0/2 --rule x
expect 2 "PATTERN:DIM with DIM 0 or 1" "--rule with an empty pattern" -- prefetch /m --shard 0/2 --rule :0
expect 2 "need --shard" "--rule without --shard" -- prefetch /m --rule 'x:0'
expect 2 "need --shard" "--uneven without --shard" -- cat /m -t x --uneven
expect 2 "takes cuda:N" "--device that names no device" -- prefetch /m --device gpu0
expect 2 "takes no --device" "--device on a command that loads nothing" -- ls --device cuda:0
expect 2 "takes yes or no" "--keep-host maybe" -- prefetch /m --device cuda:0 --keep-host maybe
expect 2 "needs --device" "--keep-host without --device" -- prefetch /m --keep-host no
expect 2 "takes no --shard" "ls --shard" -- ls --shard 0/2
expect 2 "takes no --shard" "evict --shard" -- evict /m --shard 0/2
expect 2 "needs --cluster" "--nodes without --cluster" -- prefetch /m --nodes a,b
expect 2 "takes no --cluster" "--cluster on a command that prefetches nothing" -- status --cluster
expect 2 "takes no --cluster" "--nodes on a command that prefetches nothing" -- ls --nodes a
expect 2 "takes no --keep-host" "--cluster with --keep-host" -- prefetch /m --cluster --device cuda:0 --keep-host no
expect 2 "--cluster takes no --shard" "--cluster with --shard" -- prefetch /m --cluster --shard 0/2
expect 2 "--cluster takes no --shard" "--cluster with --shard and --rule" -- prefetch /m --shard 1/2 --rule 'x:0' --cluster
expect 2 "comma-separated list of node names" "--nodes with an empty name" -- prefetch /m --cluster --nodes a,,b
expect 2 "comma-separated list of node names" "--nodes with a trailing comma" -- prefetch /m --cluster --nodes a,
expect 2 "comma-separated list of node names" "--nodes with a leading comma" -- prefetch /m --cluster --nodes ,a
expect 2 "comma-separated list of node names" "empty --nodes" -- prefetch /m --cluster --nodes ""
expect 2 "needs an argument" "--nodes without its argument" -- prefetch /m --cluster --nodes
expect 2 "takes no MODEL" "cluster with an argument" -- cluster /m
expect 2 "takes no --component" "cluster --component" -- cluster -c vae
export POSIXLY_CORRECT=1
expect 2 "unknown option '--bogus'" "options after the command under POSIXLY_CORRECT" -- ls --bogus
unset POSIXLY_CORRECT

expect 0 "" "--help" -- --help
grep -q "^Usage: weightctl" "$scratch/out" && ok "--help prints usage on stdout" || not_ok "--help prints usage on stdout"
expect 0 "" "--version" -- --version
grep -q "^weightctl [0-9]" "$scratch/out" && ok "--version names the version" || not_ok "--version names the version"

expect 1 "^weightctl: UNAVAILABLE: " "no daemon at \$WEIGHTD_SOCKET" -- status
expect 1 "^weightctl: UNAVAILABLE: " "components with no daemon" -- components /m --json
expect 1 "^weightctl: UNAVAILABLE: " "cluster with no daemon" -- cluster --json
expect 1 "^weightctl: UNAVAILABLE: " "a cluster prefetch with no daemon" -- prefetch /m --cluster --nodes a,b
expect 1 "^weightctl: UNAVAILABLE: " "no daemon at --socket" -- --socket "$scratch/other.sock" ls --json
if [ -s "$scratch/out" ]; then not_ok "nothing on stdout when it fails"; else ok "nothing on stdout when it fails"; fi

# A socket file that nobody listens on, as a crashed daemon leaves it.
if python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$scratch/stale.sock" 2>/dev/null; then
        expect 1 "^weightctl: UNAVAILABLE: " "stale socket file" -- --socket "$scratch/stale.sock" status
else
        n=$((n + 1))
        echo "ok $n # SKIP no python3 to bind a stale socket"
fi

# The plan comes last: no count to keep in step by hand.
echo "1..$n"
exit $failed
