#!/usr/bin/env bash
# bash part3/scripts/huggingface_login.sh [--no-validate] [--timeout SECONDS]
#
# Stores a Hugging Face access token for gated downloads (python part5/model_registry.py pull ...).
# The token comes from $HF_TOKEN (or $LLMLAB_HF_TOKEN) if set, else from a hidden prompt
# (nothing is shown while you paste), else from standard input when it is not a terminal.
# It is handed to Python on standard input, never as an argument (other users can see
# arguments in `ps`), is never printed, and this script keeps no shell history.
# With no network it is stored anyway; the check with the Hub is skipped with a note.
set -euo pipefail
set +x # never trace: a trace would print the token

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

usage() {
	cat <<'EOF'
usage: bash part3/scripts/huggingface_login.sh [--no-validate] [--timeout SECONDS]

Store a Hugging Face token (from https://huggingface.co/settings/tokens, read access is
enough) where huggingface_hub finds it: $HF_HOME/token (default ~/.cache/huggingface/token).

options:
  --no-validate      store without asking the Hub whether the token is valid
  --timeout SECONDS  how long to wait for the Hub before treating the machine as offline (default 3)
  -h, --help         show this help

examples:
  bash part3/scripts/huggingface_login.sh          paste the token at the hidden prompt
  read -rs HF_TOKEN && export HF_TOKEN && bash part3/scripts/huggingface_login.sh
                                                   (typing HF_TOKEN=hf_... on the command
                                                   line would put the token in your history)
  HF_HOME=/data/hf bash part3/scripts/huggingface_login.sh    store it somewhere else

environment: HF_TOKEN or LLMLAB_HF_TOKEN (the token), HF_HOME (where to store it),
PYTHON (interpreter with huggingface_hub; default: the repository's .venv).
exit status: 0 stored; 1 the Hub rejected the token (or no Python with huggingface_hub);
2 empty token or bad option.
EOF
}

args=()
while [[ $# -gt 0 ]]; do
	case $1 in
	--no-validate) args+=(--no-validate) && shift ;;
	--timeout)
		[[ $# -ge 2 ]] || { echo "error: --timeout needs a number of seconds." >&2 && exit 2; }
		args+=(--timeout "$2") && shift 2
		;;
	-h | --help) usage && exit 0 ;;
	-*)
		echo "error: unknown option '$1'." >&2
		echo "  fix: run: bash part3/scripts/huggingface_login.sh --help" >&2
		exit 2
		;;
	*) # not shown: it may be a token
		echo "error: unexpected argument. A token is never given as an argument: use the prompt or HF_TOKEN." >&2
		echo "  fix: if that was your token, it is now in your shell history: revoke it at" >&2
		echo "       https://huggingface.co/settings/tokens, then run this script and paste a new one." >&2
		exit 2
		;;
	esac
done

PY=${PYTHON:-}
if [[ -z $PY ]]; then
	if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # llmlab even when not installed
if ! "$PY" -c 'import huggingface_hub, llmlab.hf_auth' 2>/dev/null; then
	echo "error: $PY cannot import huggingface_hub and llmlab." >&2
	echo "  fix: run: make setup   (or set PYTHON to the interpreter of your environment)" >&2
	exit 1
fi

token=${HF_TOKEN:-${LLMLAB_HF_TOKEN:-}}
if [[ -n $token ]]; then
	if [[ -n ${HF_TOKEN:-} ]]; then echo "Using the token from \$HF_TOKEN."; else echo "Using the token from \$LLMLAB_HF_TOKEN."; fi
elif [[ -t 0 ]]; then
	echo "Paste your Hugging Face token (from https://huggingface.co/settings/tokens)."
	IFS= read -rs -p "Token (hidden): " token || true
	echo
else
	IFS= read -r token || true # piped in: printf '%s\n' "$TOKEN" | bash huggingface_login.sh
fi

if [[ -z ${token//[[:space:]]/} ]]; then
	echo "error: no token given (HF_TOKEN is empty and nothing was entered)." >&2
	echo "  fix: create a token at https://huggingface.co/settings/tokens, then run this script and paste it." >&2
	exit 2
fi

# printf is a shell builtin, so the token goes through a pipe without appearing in any argv.
status=0
printf '%s' "$token" | "$PY" -m llmlab.hf_auth ${args[@]+"${args[@]}"} || status=$?
token=""
exit "$status"
