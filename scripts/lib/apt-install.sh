# Shared by scripts/install-*.sh (sourced, not run): install one Debian package unless what it
# provides is already there. The caller defines two functions first:
#   present   succeeds when the tool is already installed
#   version   prints what is installed (for the log line)
# then calls `apt_install_once <what> <package> [--no-service]`. --no-service keeps the
# package's own service from ever starting: planpipe starts the binary itself on its own port.

_apt_remove_policy() {
    if [[ "${CREATED_POLICY:-0}" == 1 ]]; then "${SUDO[@]}" rm -f "$POLICY"; fi
}

apt_install_once() {
    local what=$1 package=$2 no_service=${3:-}
    local script
    script=$(basename "$0")
    if present; then
        echo "$what already installed: $(version)"
        return 0
    fi

    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            echo "$script: must run as root (or with sudo available)" >&2
            exit 1
        fi
    fi

    export DEBIAN_FRONTEND=noninteractive
    CREATED_POLICY=0
    if [[ "$no_service" == --no-service ]]; then
        # policy-rc.d: no service may start during the install (containers have no init, hosts need none).
        POLICY=/usr/sbin/policy-rc.d
        if [[ ! -e "$POLICY" ]]; then
            printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
            "${SUDO[@]}" chmod +x "$POLICY"
            CREATED_POLICY=1
        fi
        trap _apt_remove_policy EXIT
    fi

    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "$package"
    if [[ "$no_service" == --no-service ]] && command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl disable --now "$package" >/dev/null 2>&1 || true
    fi

    if ! present; then
        echo "$script: apt-get finished but $what is missing" >&2
        exit 1
    fi
    echo "$what installed: $(version)"
}
