# Sourced by scripts/test: a Docker daemon and the simulator's server image for the tests of
# the Docker backend (tests marked "docker"). Starts dockerd only when none answers, with host
# networking only (no bridge, no iptables rules: containers share the host's loopback
# addresses and no traffic goes to a private-range bridge), and stops at exit only what it
# started. Set RESILIENT_DB_DOCKER=0 to skip all of it (the docker tests then skip, saying why).
# Measured on a 2-core shared machine (2026-12-05): install + dockerd + image build from
# scratch 55 s (debootstrap and the server packages from the apt mirror: 42-65 s), docker load
# of the cached 730 MB tarball 6 s, reuse by a running daemon: instant; the docker tests
# (pytest -m docker, 29 tests) 175 s.
# Needs root (or sudo) to install docker.io/debootstrap, run dockerd and build the image.

_DOCKERD_PID=""
_DOCKERD_LOG="${TMPDIR:-/tmp}/resilient_db-dockerd.log"

_docker_answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

docker_down() {
    # Stop the daemon this script started, with every container the test run left behind.
    [ -n "$_DOCKERD_PID" ] || return 0
    local ids
    ids="$(docker ps -aq --filter label=resilient_db.simulator 2>/dev/null || true)"
    [ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
    kill "$_DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$_DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$_DOCKERD_PID" 2>/dev/null || true
    echo "docker: stopped the dockerd this run started (pid $_DOCKERD_PID)" >&2
    _DOCKERD_PID=""
}

docker_up() {
    [ "${RESILIENT_DB_DOCKER:-auto}" != "0" ] || { echo "docker: skipped (RESILIENT_DB_DOCKER=0)" >&2; return 0; }
    local started=$SECONDS missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] || _apt_install "${missing[@]}"
    if ! _docker_answers; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo dockerd --storage-driver=vfs --iptables=false --ip-masq=false --ip-forward=false \
            --bridge=none \
            >"$_DOCKERD_LOG" 2>&1 &
        _DOCKERD_PID=$!
        trap docker_down EXIT
        for _ in $(seq 1 300); do
            _docker_answers && break
            kill -0 "$_DOCKERD_PID" 2>/dev/null || break
            sleep 0.2
        done
        if ! _docker_answers; then
            echo "docker: dockerd did not come up; its log:" >&2; tail -20 "$_DOCKERD_LOG" >&2
            docker_down; return 1
        fi
        echo "docker: started dockerd (pid $_DOCKERD_PID, host networking only)" >&2
    fi
    # Testcontainers' reaper (Ryuk) is an image from a registry, which is not reachable: the
    # simulator removes its containers itself (labels, atexit, sweep) and docker_down does too.
    export TESTCONTAINERS_RYUK_DISABLED=true
    RESILIENT_DB_SIM_IMAGE="$(python -m simulator.docker_images ensure)" || { docker_down; return 1; }
    export RESILIENT_DB_SIM_IMAGE
    echo "docker: ready in $((SECONDS - started)) s (image $RESILIENT_DB_SIM_IMAGE)" >&2
}
