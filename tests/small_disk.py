"""A small disk for the disk-full tests: a tmpfs of a given size where the test can mount one
(root), else a free-space shim (tests/disk_shim/sitecustomize.py) that reports the folder as a
disk of that size to the processes started with :meth:`SmallDisk.env`."""

import os
import subprocess

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "disk_shim")


def _mount(folder, size):
    if os.environ.get("REGIONSPOT_TEST_DISK_SHIM"):  # to test the shim where tmpfs works
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder]
    return os.geteuid() == 0 and subprocess.run(cmd, capture_output=True).returncode == 0


class SmallDisk:
    """A folder on a disk of ``size`` bytes; :meth:`resize` gives it more room."""

    def __init__(self, folder, size):
        self.folder = str(folder)
        os.makedirs(self.folder)
        self.tmpfs = _mount(self.folder, size)
        self.size = size

    def resize(self, size):
        self.size = size
        if self.tmpfs:
            subprocess.run(["mount", "-o", f"remount,size={size}", self.folder], check=True)

    def env(self, **extra):
        """The environment of a process that writes to the disk."""
        env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
        if not self.tmpfs:
            env["PYTHONPATH"] = os.pathsep.join([SHIM, env.get("PYTHONPATH", "")])
            env["REGIONSPOT_TEST_DISK"] = f"{self.folder}:{self.size}"
        return env

    def close(self):
        if self.tmpfs:
            subprocess.run(["umount", "-l", self.folder], check=True)


def small_disks(tmp_path):
    """The body of a ``small_disk`` fixture (``yield from small_disks(tmp_path)``): yields
    ``make(size)``, a new :class:`SmallDisk` under ``tmp_path``; unmounts them at the end."""
    disks = []

    def make(size):
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()
