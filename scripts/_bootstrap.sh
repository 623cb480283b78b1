# Sourced by scripts/demo and scripts/test: make this machine able to run resilient_db.
# Idempotent and quiet when everything is already there. Needs root (or sudo) only to install
# missing Debian packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESILIENT_DB_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

_apt_install() {
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "bootstrap: installing Debian packages: $*" >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)  # telemetry tests (promtool too)
"$PY" -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
# simulator IAM enforcement (simulator/iam): a PAM module compiled on first use; TLS for MariaDB
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -f /usr/include/security/pam_modules.h ] || missing+=(libpam0g-dev)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# chaos suite: the HTML report is rendered in headless Chromium by tests/test_chaos_report.py
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
[ ${#missing[@]} -eq 0 ] || _apt_install "${missing[@]}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.resilient_db-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "bootstrap: installing resilient_db[dev] into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import resilient_db, psycopg, mysql.connector" 
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
