#!/usr/bin/env bash
# weightctl's bash completion, driven through COMP_WORDS, as TAP:
#   test-bash-completion.sh COMPLETION_FILE WEIGHTCTL
# Runs every case twice: with the completion file alone, and with
# bash-completion's helpers loaded first (where installed).  Checks the
# commands and options it offers against weightctl --help, and each
# command's options against what weightctl accepts.  Needs no daemon: the
# values asked of one come from a stand-in weightctl.
set -uo pipefail

completion=$(realpath "$1")
weightctl=$(realpath "$2")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() {
        n=$((n + 1)) failed=1
        echo "not ok $n - $1"
        shift
        for line in "$@"; do echo "# $line"; done
}

help=$(WEIGHTD_SOCKET=/nonexistent "$weightctl" --help) || { echo "1..0 # SKIP weightctl --help failed"; exit 1; }
help_commands=$(sed -n '/^Commands:/,/^$/p' <<<"$help" | grep -oE '^  [a-z]+' | tr -d ' ' | sort -u | xargs)
help_options=$(sed -n '/^Options:/,/^$/p' <<<"$help" | grep -oE '^ +(-[a-zA-Z], )?--[a-z-]+' |
        grep -oE -- '--[a-z-]+' | sort -u | xargs)
# Commands that take MODEL: their line in the help names it.
model_commands=$(sed -n '/^Commands:/,/^$/p' <<<"$help" | grep -oE '^  [a-z]+ MODEL' | awk '{ print $1 }' | xargs)

# A stand-in weightctl for the values asked of the daemon; it logs its
# arguments.
cat >"$tmp/weightctl" <<'EOF'
#!/bin/sh
echo "$*" >>"${0%/*}/calls"
for a; do case $a in
components) printf 'NAME KIND LIBRARY CLASS\ntransformer weights diffusers X\nvae weights diffusers Y\nscheduler no-weights diffusers Z\ntext_encoder absent - -\n'; exit 0 ;;
tensors) printf 'NAME DTYPE SHAPE SIZE\nlm_head.weight BF16 [4,4] 32\nmodel.norm.weight F32 [4] 16\n'; exit 0 ;;
cluster) printf 'NAME ADDRESS STATE\nnode1 a self\nnode2 b up\nnode node1, generation 1: 0 B sent\n'; exit 0 ;;
esac; done
exit 1
EOF
chmod +x "$tmp/weightctl"
mkdir -p "$tmp/models/flux-dev" "$tmp/models/llama"

# comp WORD... : what completing the last word offers, sorted, on one line.
# Words are as bash splits them (COMP_WORDBREAKS: "--opt=value" is three).
comp() {
        COMP_WORDS=("$@")
        COMP_CWORD=$(($# - 1))
        COMP_LINE="$*"
        COMP_POINT=${#COMP_LINE}
        COMPREPLY=()
        _weightctl
        printf '%s\n' "${COMPREPLY[@]}" | sed '/^$/d' | sort -u | xargs
}

expect() {
        local what=$1 want=$2; shift 2
        local got
        got=$(comp "$@")
        if [ "$got" = "$want" ]; then
                ok "$mode: $what"
        else
                not_ok "$mode: $what" "words: $*" "want: $want" "got:  $got"
        fi
}

run_cases() {
        expect "commands" "$help_commands" weightctl ""
        expect "commands by prefix" "pin prefetch" weightctl p
        expect "global options" "--help --socket --version" weightctl --
        expect "options of ls" "--help --json --socket --version" weightctl ls --
        expect "options after MODEL" "--component --force --help --rule --shard --socket --tensor --tensors --uneven --version" \
                weightctl cat /m --
        expect "options by prefix" "--node-device --node-shard --node-tensors --nodes" weightctl prefetch /m --no
        expect "--keep-host values" "no yes" weightctl prefetch /m --device cuda:0 --keep-host ""
        expect "--keep-host=VALUE" "yes" weightctl prefetch /m --keep-host = y
        expect "--device values" "$(
                devs="host"
                for d in /dev/nvidia[0-9]*; do [ -e "$d" ] && devs+=" cuda:${d#/dev/nvidia}"; done
                tr ' ' '\n' <<<"$devs" | sort | xargs)" weightctl prefetch /m --device ""
        expect "--device=VALUE" "host" weightctl prefetch /m --device = h
        # "cuda:" is two words to bash (':' is in COMP_WORDBREAKS): what
        # replaces the text after the colon.
        local devices
        devices=$(declare -f _weightctl_devices)
        _weightctl_devices() { printf '%s\n' host cuda:0 cuda:1 cuda:10; }
        expect "GPUs by prefix" "cuda:0 cuda:1 cuda:10" weightctl prefetch /m --device cu
        expect "GPUs after the colon" "0 1 10" weightctl prefetch /m --device cuda :
        expect "GPUs after the colon, by prefix" "1 10" weightctl prefetch /m --device cuda : 1
        expect "GPUs after --device=cuda:" "1 10" weightctl prefetch /m --device = cuda : 1
        eval "$devices"
        expect "MODEL as a path" "$tmp/models/flux-dev" weightctl prefetch "$tmp/models/fl"
        expect "no second MODEL" "" weightctl prefetch "$tmp/models/flux-dev" "$tmp/models/l"
        expect "no MODEL for ls" "" weightctl ls "$tmp/models/l"
        expect "--socket as a path" "$tmp/models" weightctl --socket "$tmp/mod"
        expect "--socket=PATH" "$tmp/models" weightctl --socket = "$tmp/mod"
        expect "no value offered for --shard" "" weightctl prefetch /m --shard ""

        rm -f "$tmp/calls"
        expect "--component from the daemon (kind weights)" "transformer vae" \
                "$tmp/weightctl" -s /run/x.sock prefetch /m/flux --component ""
        if grep -qx -- "--socket /run/x.sock components /m/flux" "$tmp/calls" 2>/dev/null; then
                ok "$mode: the daemon is asked at the command line's --socket"
        else
                not_ok "$mode: the daemon is asked at the command line's --socket" "calls: $(cat "$tmp/calls" 2>/dev/null)"
        fi
        expect "--tensor from the daemon" "lm_head.weight" "$tmp/weightctl" cat /m/llama --tensor lm
        expect "--nodes from the daemon, after a comma" "node1,node2" "$tmp/weightctl" prefetch /m --cluster --nodes node1,no
        expect "nothing when no daemon answers" "" weightctl prefetch /m --component ""

        # In step with --help: the union of what each command offers.
        local offered="" c
        for c in "" $help_commands; do
                offered+=" $(comp weightctl $c --)"
        done
        offered=$(tr ' ' '\n' <<<"$offered" | sed '/^$/d' | sort -u | xargs)
        if [ "$offered" = "$help_options" ]; then
                ok "$mode: the options offered are weightctl --help's"
        else
                not_ok "$mode: the options offered are weightctl --help's" \
                        "weightctl --help: $help_options" "completion:       $offered" \
                        "update shell-completion/bash/weightctl"
        fi
}

# Each command's options against weightctl itself: an option offered is not
# refused as one the command does not take, and one not offered is a usage
# error.  Values are plausible ones; the socket does not exist, so a command
# line weightctl accepts ends in UNAVAILABLE (exit 1).
check_accepted() {
        local c o model args out rc bad=()
        for c in $help_commands; do
                local offered=" $(comp weightctl "$c" --) "
                for o in $help_options; do
                        case $o in --help | --version | --socket) continue ;; esac
                        model=()
                        [[ " $model_commands " == *" $c "* ]] && model=("$tmp/models/flux-dev")
                        args=("$o")
                        case $o in
                        --component | --tensor | --tensors) args+=(x) ;;
                        --shard) args+=(0/2) ;;
                        --rule) args+=('*:0' --shard 0/2) ;;
                        --uneven) args+=(--shard 0/2) ;;
                        --device) args+=(host) ;;
                        --keep-host) args+=(yes --device cuda:0) ;;
                        --nodes) args+=(a --cluster) ;;
                        --node-shard) args+=(a=0/2 --cluster) ;;
                        --node-tensors) args+=(a=x --cluster) ;;
                        --node-device) args+=(a=host --cluster) ;;
                        esac
                        [ "$c" = cat ] && [ "$o" != --tensor ] && args+=(--tensor x)
                        out=$(WEIGHTD_SOCKET="$tmp/none.sock" "$weightctl" "$c" "${model[@]}" "${args[@]}" </dev/null 2>&1 >/dev/null)
                        rc=$?
                        if [[ $offered == *" $o "* ]]; then
                                if [ $rc -eq 2 ]; then
                                        bad+=("$c $o is offered, but: weightctl $c ${model[*]} ${args[*]}: ${out%%$'\n'*}")
                                fi
                        elif [ $rc -ne 2 ]; then
                                bad+=("$c $o is not offered, but weightctl $c ${model[*]} ${args[*]} took it (exit $rc)")
                        fi
                done
        done
        if [ ${#bad[@]} -eq 0 ]; then
                ok "each command offers the options weightctl accepts for it"
        else
                not_ok "each command offers the options weightctl accepts for it" "${bad[@]}" \
                        "update _weightctl_options in shell-completion/bash/weightctl"
        fi
}

with_bc=/usr/share/bash-completion/bash_completion
mode=plain
(
        # shellcheck source=/dev/null
        . "$completion"
        if complete -p weightctl | grep -q -- '-F _weightctl'; then ok "$mode: complete -F _weightctl weightctl"; else not_ok "$mode: registered"; fi
        run_cases
        check_accepted
        exit $failed
) >"$tmp/plain.tap"
rc_plain=$?
cat "$tmp/plain.tap"
n=$(grep -cE '^(not )?ok ' "$tmp/plain.tap")

mode=bash-completion
if [ -r "$with_bc" ]; then
        (
                # bash_completion reads these unset; it is not written for set -u.
                set +u
                # shellcheck source=/dev/null
                . "$with_bc"
                . "$completion"
                if complete -p weightctl | grep -q -- '-F _weightctl'; then ok "$mode: complete -F _weightctl weightctl"; else not_ok "$mode: registered"; fi
                run_cases
                exit $failed
        ) >"$tmp/bc.tap"
        rc_bc=$?
        cat "$tmp/bc.tap"
        n=$((n + $(grep -cE '^(not )?ok ' "$tmp/bc.tap")))
else
        rc_bc=0
        n=$((n + 1))
        echo "ok $n # SKIP $mode: bash-completion is not installed ($with_bc)"
fi

# The plan last: the number of cases depends on what is installed.
echo "1..$n"
[ $rc_plain -eq 0 ] && [ $rc_bc -eq 0 ]
