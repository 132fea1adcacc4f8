"""A small disk for the disk-full tests where no tmpfs can be mounted (not root, or no
permission): ``REGIONSPOT_TEST_DISK=FOLDER:BYTES`` makes ``shutil.disk_usage`` of FOLDER (and
below) report BYTES minus what FOLDER holds as free, so the project's free-space checks refuse
a write that would not fit, as a full file system of that size would."""

import os
import shutil

_spec = os.environ.get("REGIONSPOT_TEST_DISK", "")
if _spec:
    _folder, _size = _spec.rsplit(":", 1)
    _folder, _size = os.path.realpath(_folder), int(_size)
    _real_disk_usage = shutil.disk_usage

    def _used(folder):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
                   if os.path.exists(os.path.join(root, f)))

    def disk_usage(path):
        real = os.path.realpath(path)
        if real == _folder or real.startswith(_folder + os.sep):
            used = _used(_folder)
            return type(_real_disk_usage(path))(_size, used, max(_size - used, 0))
        return _real_disk_usage(path)

    shutil.disk_usage = disk_usage
