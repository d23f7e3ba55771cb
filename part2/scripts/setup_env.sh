#!/usr/bin/env bash
# bash part2/scripts/setup_env.sh [--venv DIR] [--python PYTHON] [--conda] [--skip-check] [--dry-run] [--force]
#
# Creates the Local LLM Lab environment and checks it:
#   1. finds Python 3.11+ (and, for venv, a C/C++ compiler: llama-cpp-python is built from source)
#   2. creates DIR with venv (default .venv) or, with --conda, a conda environment from environment.yml
#   3. installs llama-cpp-python built for this CPU (python -m llmlab.llama_build install), the pins
#      (requirements.txt), then this repository's llmlab package (pip install -e .)
#   4. registers the Jupyter kernel "python3" inside the environment, and proves llama.cpp by a
#      real generation (python -m llmlab.llama_build repair: a crash rebuilds without AMX, ...)
#   5. runs the environment doctor (scripts/check_env.py) and exits with its status
# Safe to run twice: a stamp file in DIR records a hash of the requirement files, so a second
# run skips the install ("already up to date") until requirements.txt or pyproject.toml change.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PIP_VERSION=26.3 # same pip as the Makefile, so both routes resolve the pins alike
STAMP_NAME=.llmlab-setup-stamp
KERNEL_LABEL="Python 3 (llmlab)"

usage() {
	cat <<EOF
usage: bash part2/scripts/setup_env.sh [options]

Create the environment for Local LLM Lab, install the pinned requirements and the llmlab
package, register the Jupyter kernel, then run the environment doctor.

options:
  --venv DIR       environment folder (default: $ROOT/.venv)
  --python PYTHON  Python 3.11+ used to create a venv (default: first of python3.11,
                   python3.12, python3.13, python3, python that is new enough)
  --conda          create a conda environment from environment.yml instead of a venv
                   (it brings its own Python and compilers)
  --skip-check     do not run the doctor (scripts/check_env.py) at the end
  --dry-run        print the steps that would run; change nothing
  --force          reinstall even when the stamp says the environment is up to date
  -h, --help       show this help

examples:
  bash part2/scripts/setup_env.sh                        .venv with the system's Python 3.11+
  bash part2/scripts/setup_env.sh --python python3.12    choose the interpreter
  bash part2/scripts/setup_env.sh --conda --venv ~/envs/llmlab
  bash part2/scripts/setup_env.sh --dry-run              see what it would do
  make setup                                             the Makefile's equivalent (venv only)

exit status: 0 ready; 1 a problem with this machine (message says what to install);
2 bad options; otherwise the doctor's status (1: a check failed).
EOF
}

say() { printf '%s\n' "$*"; }
fail() { # fail STATUS MESSAGE [FIX...]: one line saying what is wrong, then what to do
	local status=$1 message=$2
	shift 2
	printf 'error: %s\n' "$message" >&2
	local fix
	for fix in "$@"; do printf '  fix: %s\n' "$fix" >&2; done
	exit "$status"
}

# run CMD...: print the command (quoted so it can be copied), then run it unless --dry-run.
run() {
	printf '+'
	printf ' %q' "$@"
	printf '\n'
	if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# --------------------------------------------------------------------------- options

VENV="" PYTHON="" USE_CONDA=0 SKIP_CHECK=0 DRY_RUN=0 FORCE=0
while [[ $# -gt 0 ]]; do
	case $1 in
	--venv | --python)
		[[ $# -ge 2 && -n $2 ]] || fail 2 "$1 needs a value." "run: bash part2/scripts/setup_env.sh --help"
		if [[ $1 == --venv ]]; then VENV=$2; else PYTHON=$2; fi
		shift 2
		;;
	--venv=*) VENV=${1#*=} && shift ;;
	--python=*) PYTHON=${1#*=} && shift ;;
	--conda) USE_CONDA=1 && shift ;;
	--skip-check) SKIP_CHECK=1 && shift ;;
	--dry-run) DRY_RUN=1 && shift ;;
	--force) FORCE=1 && shift ;;
	-h | --help) usage && exit 0 ;;
	*) fail 2 "unknown option '$1'." "run: bash part2/scripts/setup_env.sh --help" ;;
	esac
done
VENV=${VENV:-$ROOT/.venv}
[[ $VENV == /* ]] || VENV=$PWD/$VENV # relative to where the user ran the script
cd "$ROOT"

# --------------------------------------------------------------------------- hints per system

os_family() {
	case "$(uname -s)" in
	Darwin) echo macos ;;
	MINGW* | MSYS* | CYGWIN*) echo windows ;;
	Linux)
		local id=""
		# shellcheck disable=SC1091 # os-release is a system file, read only for ID / ID_LIKE
		[[ -r /etc/os-release ]] && id=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
		case " $id " in
		*" debian "* | *" ubuntu "*) echo debian ;;
		*" fedora "* | *" rhel "* | *" centos "*) echo fedora ;;
		*" arch "*) echo arch ;;
		*" suse "* | *" opensuse "*) echo suse ;;
		*" alpine "*) echo alpine ;;
		*) echo linux ;;
		esac
		;;
	*) echo other ;;
	esac
}

compiler_hint() {
	case "$(os_family)" in
	debian) echo "sudo apt-get install build-essential" ;;
	fedora) echo "sudo dnf install gcc gcc-c++ make" ;;
	arch) echo "sudo pacman -S base-devel" ;;
	suse) echo "sudo zypper install gcc gcc-c++ make" ;;
	alpine) echo "sudo apk add build-base" ;;
	macos) echo "xcode-select --install" ;;
	windows) echo "install Visual Studio Build Tools (workload: Desktop development with C++), or use WSL" ;;
	*) echo "install gcc and g++ (or clang) with your system's package manager" ;;
	esac
}

python_hint() {
	case "$(os_family)" in
	debian) echo "sudo apt-get install python3.11 python3.11-venv" ;;
	fedora) echo "sudo dnf install python3.11" ;;
	arch) echo "sudo pacman -S python" ;;
	suse) echo "sudo zypper install python311" ;;
	alpine) echo "sudo apk add python3 py3-pip" ;;
	macos) echo "brew install python@3.11" ;;
	windows) echo "winget install Python.Python.3.11" ;;
	*) echo "install Python 3.11 from https://www.python.org/downloads/" ;;
	esac
}

# --------------------------------------------------------------------------- checks

# python_version PY: prints "MAJOR MINOR MICRO" of interpreter PY, or nothing if it does not run.
python_version() {
	"$1" -c 'import sys; print(*sys.version_info[:3])' 2>/dev/null || true
}

new_enough() { # new_enough "MAJOR MINOR MICRO"
	local major minor
	read -r major minor _ <<<"$1"
	[[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] && ((major > 3 || (major == 3 && minor >= 11)))
}

pick_python() {
	local candidates found="" py version
	if [[ -n $PYTHON ]]; then candidates=("$PYTHON"); else
		# 3.11 first: the pins are tested on it (CI, environment.yml).
		candidates=(python3.11 python3.12 python3.13 python3 python)
	fi
	for py in "${candidates[@]}"; do
		command -v "$py" >/dev/null 2>&1 || continue
		version=$(python_version "$py")
		if [[ -n $version ]] && new_enough "$version"; then
			BASE_PY=$(command -v "$py")
			BASE_VERSION=${version// /.}
			return 0
		fi
		found+="${found:+, }$py ${version:+${version// /.}}"
		found=${found% }
	done
	if [[ -z $found ]]; then
		fail 1 "no Python found (looked for: ${candidates[*]})." \
			"$(python_hint)" "then run: bash part2/scripts/setup_env.sh${PYTHON:+ --python $PYTHON}" \
			"or use conda: bash part2/scripts/setup_env.sh --conda"
	fi
	fail 1 "Python 3.11 or newer is needed; found $found, which is too old." \
		"$(python_hint)" "then run: bash part2/scripts/setup_env.sh --python python3.11" \
		"or use conda, which brings its own Python: bash part2/scripts/setup_env.sh --conda"
}

check_venv_module() {
	"$BASE_PY" -c 'import venv, ensurepip' 2>/dev/null && return 0
	local hint="reinstall Python from https://www.python.org/downloads/"
	[[ $(os_family) == debian ]] && hint="sudo apt-get install python${BASE_VERSION%.*}-venv"
	fail 1 "$BASE_PY cannot create virtual environments (the venv/ensurepip module is missing)." "$hint"
}

check_compiler() {
	local cc="" cxx="" name
	if [[ -n ${CC:-} ]] && command -v "${CC%% *}" >/dev/null 2>&1; then cc=$CC; fi
	if [[ -n ${CXX:-} ]] && command -v "${CXX%% *}" >/dev/null 2>&1; then cxx=$CXX; fi
	for name in cc gcc clang; do
		[[ -z $cc ]] && command -v "$name" >/dev/null 2>&1 && cc=$name
	done
	for name in c++ g++ clang++; do
		[[ -z $cxx ]] && command -v "$name" >/dev/null 2>&1 && cxx=$name
	done
	[[ -n $cc && -n $cxx ]] && return 0
	local missing="C compiler (cc, gcc or clang)"
	[[ -n $cc ]] && missing="C++ compiler (c++, g++ or clang++)"
	[[ -z $cc && -z $cxx ]] && missing="C/C++ compiler (cc, gcc or clang; c++, g++ or clang++)"
	fail 1 "no $missing found; llama-cpp-python is built from source and needs one." \
		"$(compiler_hint)" "then run this script again (or use --conda, which installs compilers)"
}

# requirements_hash: one sha256 over the files that decide what gets installed.
requirements_hash() {
	local files=(requirements.txt pyproject.toml)
	[[ $USE_CONDA == 1 ]] && files+=(environment.yml)
	{
		echo "mode=$MODE"
		cat "${files[@]}"
	} | if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1
}

env_python() { # the interpreter inside the environment (bin/ on Unix, Scripts/ on Windows)
	if [[ -x $VENV/Scripts/python.exe && ! -x $VENV/bin/python ]]; then
		echo "$VENV/Scripts/python.exe"
	else echo "$VENV/bin/python"; fi
}

# --------------------------------------------------------------------------- main

MODE=venv
[[ $USE_CONDA == 1 ]] && MODE=conda
[[ $DRY_RUN == 1 ]] && say "Dry run: printing the steps; nothing is changed."

if [[ $MODE == conda ]]; then
	CONDA=${CONDA_EXE:-}
	[[ -n $CONDA ]] || CONDA=$(command -v conda || command -v mamba || true)
	[[ -n $CONDA ]] || fail 1 "--conda was given but conda is not installed (no conda or mamba on PATH)." \
		"install Miniforge: https://conda-forge.org/download/" \
		"or use a venv: bash part2/scripts/setup_env.sh"
	if [[ -e $VENV && ! -d $VENV/conda-meta ]]; then
		fail 1 "$VENV exists and is not a conda environment." \
			"choose another folder (--venv DIR) or delete it: rm -rf '$VENV'"
	fi
	say "Using conda: $CONDA (Python and compilers come from environment.yml)"
else
	pick_python
	say "Using Python $BASE_VERSION: $BASE_PY"
	check_venv_module
fi

PY=$(env_python)
if [[ -x $PY && $MODE == venv ]]; then
	existing=$(python_version "$PY")
	if [[ -n $existing ]] && ! new_enough "$existing"; then
		fail 1 "$VENV was made with Python ${existing// /.}, which is too old." \
			"delete it and run again: rm -rf '$VENV' && bash part2/scripts/setup_env.sh"
	fi
fi

STAMP=$VENV/$STAMP_NAME
HASH=$(requirements_hash)
if [[ $FORCE == 0 && -x $PY && -f $STAMP && $(head -n1 "$STAMP") == "$HASH" ]]; then
	say "Environment $VENV is already up to date (requirements unchanged); skipping the install."
	say "  (use --force to reinstall)"
else
	[[ $MODE == venv ]] && check_compiler
	trap 'echo "error: the step above failed. Fix what it reports, then run this script again." >&2' ERR
	say "Setting up $VENV ($MODE)."
	# llama-cpp-python is built for this CPU by llmlab/llama_build.py (explicit instruction sets,
	# no AMX, no OpenMP, one cached wheel per CPU type); extra CMake flags go in CMAKE_ARGS.
	[[ -x $PY ]] || say "The first install builds llama-cpp-python: about 10 minutes on 2 cores."
	if [[ $MODE == conda ]]; then
		if [[ -d $VENV/conda-meta ]]; then
			run "$CONDA" env update --prefix "$VENV" --file environment.yml --prune
		else
			run "$CONDA" env create --prefix "$VENV" --file environment.yml
		fi
	else
		[[ -x $PY ]] || run "$BASE_PY" -m venv "$VENV"
		run "$PY" -m pip install --quiet --upgrade "pip==$PIP_VERSION"
		run "$PY" -m llmlab.llama_build install
		run "$PY" -m pip install --quiet -r requirements.txt
	fi
	run "$PY" -m pip install --quiet --no-deps -e .
	run "$PY" -m ipykernel install --sys-prefix --name python3 --display-name "$KERNEL_LABEL"
	# Prove the build with a real generation; a crash rebuilds without the feature that crashed.
	run "$PY" -m llmlab.llama_build repair
	if [[ $DRY_RUN == 0 ]]; then
		printf '%s\n# requirements hash written by part2/scripts/setup_env.sh on %s\n' \
			"$HASH" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$STAMP"
	fi
	say "+ write $STAMP (requirements hash ${HASH:0:12})"
	trap - ERR
fi

if [[ $SKIP_CHECK == 1 ]]; then
	say "Skipping the doctor (--skip-check). Run it later: $PY scripts/check_env.py"
	exit 0
fi
say "Checking the environment (scripts/check_env.py)..."
status=0
run "$PY" scripts/check_env.py || status=$?
if [[ $status != 0 ]]; then
	say "The doctor found problems (exit status $status): run the fix under each [FAIL] line, then: $PY scripts/check_env.py" >&2
	exit "$status"
fi
if [[ $DRY_RUN == 1 ]]; then
	say "Dry run finished: run again without --dry-run to do these steps."
else
	say "Ready. Activate the environment with: source $VENV/bin/activate   (or use: make chat)"
fi
