"""The architecture table: every spelling and QEMU fact of an architecture, in one place.

Everything that differs between architectures is a field of `Arch`; code asks the
row, it never branches on an architecture's name.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str  # our canonical name (also the kernel cache key's arch part)
    vng_name: str  # vng's --arch spelling
    aliases: tuple[str, ...]  # other spellings accepted on input (case-insensitive)
    kernel_arch: str  # make ARCH=
    uname_m: str  # `uname -m` inside a guest of this arch
    dpkg_arch: str  # `dpkg --print-architecture`
    elf_machine: int  # e_machine of this arch's ELF binaries
    qemu_binary: str
    qemu_package: str  # Debian package shipping qemu_binary
    kvm_machine: str
    kvm_cpu: str
    tcg_machine: str
    tcg_cpu: str
    tcg_accel: str  # TCG accelerator options (multi-threaded TCG: a host thread per vCPU)
    console: str  # guest serial console device
    boot_images: tuple[str, ...]  # relative to a build tree, first is preferred
    cross_compile: str  # CROSS_COMPILE= prefix when the host is another arch
    tcg_memory_cap_mib: int  # default memory is capped to this under TCG
    tcg_append: str = ""  # kernel command line under TCG only
    # A few bytes of machine code that prove a KVM guest really runs: placed at
    # probe_offset in a probe_size firmware image, it makes QEMU exit with
    # probe_status. Empty where we have no probe (then `accel=auto` trusts /dev/kvm).
    probe_code: str = ""
    probe_offset: int = 0
    probe_size: int = 0
    probe_status: int = 0
    probe_qemu_args: tuple[str, ...] = ()
    # QEMU's virtio-serial bus for the guest console log: a virtconsole on it is the
    # guest's hvc0, a console of its own beside the serial one (the 8250 driver has
    # one console, so a second UART cannot be one). Only x86_64 is verified; on
    # ppc64le hvc0 is the main console already, so the log stays empty there.
    log_console_bus: str = ""
    # kconfig-base tiny: what this arch needs on top of tinyconfig, kvm_guest.config and
    # templates/kconfig-tiny.config.j2 (empty: no tiny kernel for this arch yet).
    tiny_kconfig: tuple[str, ...] = ()
    # Debian 12's distro kernel metapackage of this arch (guestroot.py fetches it for a foreign guest),
    # and whether Debian 12 has a userland of this arch to make a guest root from (guestroot.py).
    debian_kernel: str = ""
    # QEMU's vmcoreinfo device (fw_cfg with DMA) exists on this arch's machine: its dumps carry the guest
    # kernel's VMCOREINFO, which drgn needs (`vmcore`).
    vmcoreinfo: bool = False
    debian_userland: bool = True


# The guest kernel hands QEMU's dumps its VMCOREINFO through fw_cfg (`vmcore`, vngtasks/vmcore.py); /proc/kcore
# selects VMCORE_INFO (and lets drgn read the running kernel in the guest).
_VMCOREINFO_KCONFIG = ("CONFIG_FW_CFG_SYSFS=y", "CONFIG_PROC_KCORE=y")

ARCHES: tuple[Arch, ...] = (
    Arch(
        name="x86_64",
        vng_name="amd64",
        aliases=("amd64", "x64", "x86-64"),
        kernel_arch="x86_64",  # as vng gives make: a 64-bit kernel whatever the config says
        uname_m="x86_64",
        dpkg_arch="amd64",
        elf_machine=62,
        qemu_binary="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        kvm_machine="q35",
        kvm_cpu="host",
        tcg_machine="q35",
        # x86-64-v2 (SSE4.2, POPCNT), what Debian, Ubuntu and RHEL 9 binaries need: `max` makes glibc
        # pick AVX2 code that TCG emulates slowly (a boot's userspace init takes seconds longer).
        # A workload that needs more asks for it: `--qemu-opts "-cpu max"` comes after this.
        tcg_cpu="qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
        tcg_accel="tcg",
        # QEMU 7.2's multi-threaded TCG once raced a 6.12 kernel patching sched_clock's static key at
        # runtime (an int3 Oops in sched_clock_cpu, seen once in this project): with an unstable TSC
        # from the start the kernel never patches that key. (40 boots of a vng-base 6.12 kernel under
        # multi-threaded TCG, 10 beside two busy loops, showed no splat with or without it.)
        tcg_append="tsc=unstable",
        debian_kernel="linux-image-amd64",
        console="ttyS0",
        boot_images=("arch/x86/boot/bzImage",),
        cross_compile="x86_64-linux-gnu-",
        tcg_memory_cap_mib=4096,
        log_console_bus="virtio-serial-pci",
        tiny_kconfig=(
            "CONFIG_64BIT=y",  # tinyconfig under ARCH=x86 would be a 32-bit kernel
            # ACPI: the CPUs beyond the first (the MP table lists one) and power-off.
            "CONFIG_ACPI=y",
            "# CONFIG_ACPI_AC is not set",
            "# CONFIG_ACPI_BATTERY is not set",
            "# CONFIG_ACPI_BUTTON is not set",
            "# CONFIG_ACPI_FAN is not set",
            "# CONFIG_ACPI_THERMAL is not set",
            "# CONFIG_ACPI_TABLE_UPGRADE is not set",
            "# CONFIG_SCHED_MC is not set",  # it selects cpufreq, hence ACPI's processor driver
            "# CONFIG_X86_MCE is not set",
            "CONFIG_PROCESSOR_SELECT=y",
            "# CONFIG_CPU_SUP_HYGON is not set",
            "# CONFIG_CPU_SUP_CENTAUR is not set",
            "# CONFIG_CPU_SUP_ZHAOXIN is not set",
            "CONFIG_SERIAL_8250=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            *_VMCOREINFO_KCONFIG,
        ),
        vmcoreinfo=True,
        # Real mode, from the reset vector (0xFFF0: a jump back to 0xFF80). Where the CPU has XSAVE, it runs
        # XSETBV, XSAVE and XRSTOR first, as every kernel's FPU setup does: a KVM that runs plain real mode but
        # cannot run a kernel (kvm-pvm on a 6.18 host: "KVM internal error" at XRSTOR, 4 min into a boot) fails
        # here. Then the exit: isa-debug-exit turns the write into exit status (0x41 << 1) | 1 = 131.
        probe_code="".join(
            (
                "66b801000000",  # mov eax, 1
                "0fa2",  # cpuid
                "660fbae11a",  # bt ecx, 26: XSAVE?
                "7335",  # jnc exit
                "0f20e0660d000004000f22e0",  # mov eax, cr4; or eax, 1 << 18 (OSXSAVE); mov cr4, eax
                "6631c966b8030000006631d2",  # xor ecx, ecx; mov eax, 3 (x87, SSE); xor edx, edx
                "0f01d1",  # xsetbv
                "31c08ed8",  # xor ax, ax; mov ds, ax
                "66b8ffffffff66baffffffff",  # mov eax, -1; mov edx, -1: every component
                "0fae260010",  # xsave [0x1000]
                "0fae2e0010",  # xrstor [0x1000]
                "b041e6f4f4ebfd",  # exit: mov al, 0x41; out 0xf4, al; hlt; jmp $-1
                "00" * 37,
                "eb8e",  # at 0xFFF0, the reset vector: jmp 0xFF80
            )
        ),
        probe_offset=0xFF80,
        probe_size=0x10000,
        probe_status=131,
        probe_qemu_args=("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"),
    ),
    Arch(
        name="arm64",
        vng_name="arm64",
        aliases=("aarch64",),
        kernel_arch="arm64",
        uname_m="aarch64",
        dpkg_arch="arm64",
        elf_machine=183,
        qemu_binary="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        kvm_machine="virt,gic-version=host",
        kvm_cpu="host",
        tcg_machine="virt",
        # max with pointer authentication's cheap implementation-defined algorithm: plain max emulates
        # QARMA5 on every signed return, which made a Debian arm64 boot here take 4x as long.
        tcg_cpu="max,pauth-impdef=on",
        tcg_accel="tcg",
        debian_kernel="linux-image-arm64",
        console="ttyAMA0",
        boot_images=("arch/arm64/boot/Image",),
        cross_compile="aarch64-linux-gnu-",
        tcg_memory_cap_mib=4096,
        log_console_bus="virtio-serial-device",
        # QEMU's virt machine, booted from its device tree: arm64 is always 64-bit and selects the GIC,
        # the architected timer, the AMBA bus and PSCI (which powers the guest off) itself.
        tiny_kconfig=(
            "CONFIG_SERIAL_AMBA_PL011=y",  # ttyAMA0, the serial console
            "CONFIG_SERIAL_AMBA_PL011_CONSOLE=y",  # and earlycon=pl011, which vng appends
            "CONFIG_ARM_PSCI_FW=y",  # selected by arm64; named here as what powers off the guest
            "CONFIG_VIRTIO_MMIO=y",  # vng's virtio devices on arm64 are virtio-*-device, on MMIO
            "CONFIG_PCI_HOST_GENERIC=y",  # the ECAM host bridge, for virtio-*-pci devices (qemu-opts)
            "# CONFIG_SERIAL_8250 is not set",  # kvm_guest.config's; the virt machine has none
            *_VMCOREINFO_KCONFIG,
        ),
        vmcoreinfo=True,
        # At the flash base: movz w0,#8; movk w0,#0x8400,lsl 16; hvc #0 -- the
        # PSCI SYSTEM_OFF call, after which QEMU exits with status 0.
        probe_code="000180520080b072020000d4",
        probe_offset=0,
        probe_size=0x1000,
        probe_status=0,
    ),
    Arch(
        name="riscv64",
        vng_name="riscv64",
        aliases=("riscv",),
        kernel_arch="riscv",
        uname_m="riscv64",
        dpkg_arch="riscv64",
        elf_machine=243,
        qemu_binary="qemu-system-riscv64",
        qemu_package="qemu-system-misc",
        kvm_machine="virt",
        kvm_cpu="host",
        tcg_machine="virt",
        tcg_cpu="rv64",
        tcg_accel="tcg",
        debian_userland=False,  # riscv64 is not a release architecture of Debian 12
        console="ttyS0",
        boot_images=("arch/riscv/boot/Image",),
        cross_compile="riscv64-linux-gnu-",
        tcg_memory_cap_mib=4096,
        log_console_bus="virtio-serial-pci",
    ),
    Arch(
        name="s390x",
        vng_name="s390x",
        aliases=("s390",),
        kernel_arch="s390",
        uname_m="s390x",
        dpkg_arch="s390x",
        elf_machine=22,
        qemu_binary="qemu-system-s390x",
        qemu_package="qemu-system-misc",
        kvm_machine="s390-ccw-virtio",
        kvm_cpu="host",
        tcg_machine="s390-ccw-virtio",
        tcg_cpu="max",
        tcg_accel="tcg",
        debian_kernel="linux-image-s390x",
        console="ttysclp0",
        boot_images=("arch/s390/boot/bzImage",),
        cross_compile="s390x-linux-gnu-",
        tcg_memory_cap_mib=4096,
        log_console_bus="virtio-serial-ccw",
    ),
    Arch(
        name="ppc64le",
        vng_name="ppc64el",
        aliases=("ppc64el", "powerpc64le"),
        kernel_arch="powerpc",
        uname_m="ppc64le",
        dpkg_arch="ppc64el",
        elf_machine=21,
        qemu_binary="qemu-system-ppc64",
        qemu_package="qemu-system-ppc",
        kvm_machine="pseries",
        kvm_cpu="host",
        tcg_machine="pseries",
        tcg_cpu="POWER9",
        tcg_accel="tcg",
        debian_kernel="linux-image-powerpc64le",
        console="hvc0",
        boot_images=("vmlinux",),
        cross_compile="powerpc64le-linux-gnu-",
        tcg_memory_cap_mib=4096,
        log_console_bus="virtio-serial-pci",
    ),
)

_BY_SPELLING: dict[str, Arch] = {
    spelling.lower(): arch for arch in ARCHES for spelling in (arch.name, arch.uname_m, arch.dpkg_arch, *arch.aliases)
}


def names() -> list[str]:
    return [arch.name for arch in ARCHES]


def lookup(spelling: str) -> Arch:
    """The row for any accepted spelling (`aarch64`, `ARM64`, `amd64`, ...)."""
    try:
        return _BY_SPELLING[spelling.strip().lower()]
    except KeyError:
        raise KeyError(spelling) from None


def host() -> Arch:
    return lookup(platform.machine())
