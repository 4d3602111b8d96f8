# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own): dry runs, quoting, errors
# and option parsing. The scripts avoid bash 4 features (wait -n, associative arrays, bare empty
# array expansions under set -u) so that they can run on a Mac's bash 3.2 (tested here on bash 5 only).
#
# A script sets SCRIPT_NAME, sources this file, and runs every side effect through `run` (or
# prints it with `print_command`), so that DRY_RUN=1 or --dry-run shows each command, one per line
# as `+ command`, and runs none.

DRY_RUN=${DRY_RUN:-0}

# Usage errors exit 2 (as getopt does), failures of what was launched exit 1 or its own status.
die() {
    printf '%s: error: %s (see --help)\n' "$SCRIPT_NAME" "$*" >&2
    exit 2
}

note() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

is_dry_run() {
    [[ -n $DRY_RUN && $DRY_RUN != 0 ]]
}

# One word as the shell reads it back: bare when safe, else in single quotes, or in double quotes
# when that avoids escaping single quotes (nothing in the word expands inside them).
quote() {
    local word=$1
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$word"
    elif [[ $word != *"'"* ]]; then
        printf "'%s'" "$word"
    elif [[ $word != *[\"\$\`\\!]* ]]; then
        printf '"%s"' "$word"
    else
        printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
}

# The words of a command, each quoted, joined by spaces: a line that a shell runs as the same argv.
quote_words() {
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(quote "$word")"
    done
    printf '%s' "$out"
}

# `+ command` on stdout in a dry run (the dry run's output), on stderr otherwise (a trace).
print_command() {
    if is_dry_run; then
        printf '+ %s\n' "$*"
    else
        printf '+ %s\n' "$*" >&2
    fi
}

# Prints the command, then runs it unless this is a dry run.
run() {
    print_command "$(quote_words "$@")"
    is_dry_run || "$@"
}

# Prints the command, then replaces this shell with it (signals reach it directly); a dry run
# ends here too, as the script would.
run_exec() {
    print_command "$(quote_words "$@")"
    if is_dry_run; then
        exit 0
    fi
    exec "$@"
}

# Splits `--option=value` into `--option value` up to a `--` (after which words are left alone),
# leaving the result in SPLIT_ARGS, so option loops need handle only the spaced form.
split_option_values() {
    SPLIT_ARGS=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --)
                SPLIT_ARGS+=("$@")
                return
                ;;
            --*=*) SPLIT_ARGS+=("${1%%=*}" "${1#*=}") ;;
            *) SPLIT_ARGS+=("$1") ;;
        esac
        shift
    done
}

# `need_value "$@"` in an option loop: the option ($1) has a value ($2).
need_value() {
    [[ $# -ge 2 && $2 != -- ]] || die "$1 needs a value"
}

need_positive_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"
}

# The repository root: the parent of launch/.
repo_root() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}
