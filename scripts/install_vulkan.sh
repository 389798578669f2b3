#!/usr/bin/env bash
# Installs what the Vulkan backend needs to build its shaders and to run on this machine
# without a GPU: the Vulkan loader, Mesa's lavapipe (a CPU Vulkan driver: correct, not fast),
# the glslc shader compiler and spirv-tools (Debian packages, installed with apt when missing;
# needs root, as on the development and CI machines). A machine with a real GPU driver needs
# only the loader and glslc; lavapipe is then one more device the backend can pick.
set -euo pipefail

have_tools() {
    command -v glslc >/dev/null && command -v spirv-val >/dev/null &&
        { ldconfig -p | grep -q 'libvulkan\.so\.1'; } &&
        ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1
}

if have_tools; then
    exit 0
fi
echo "install_vulkan: installing the Vulkan loader, lavapipe, glslc and spirv-tools (Debian packages)"
if [ "$(id -u)" != 0 ]; then
    echo "install_vulkan: needs root to install packages (libvulkan1 mesa-vulkan-drivers glslc spirv-tools vulkan-tools)" >&2
    exit 1
fi
# Two tries: a mirror's passing hiccup should not fail the whole test run.
for try in 1 2; do
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvulkan1 mesa-vulkan-drivers glslc spirv-tools vulkan-tools >/dev/null; then
        break
    fi
    [ "$try" = 2 ] || { echo "install_vulkan: apt failed, trying once more in 20 s" >&2; sleep 20; }
done
have_tools || { echo "install_vulkan: the packages installed but glslc, spirv-val, libvulkan.so.1 or lavapipe is still missing" >&2; exit 1; }
