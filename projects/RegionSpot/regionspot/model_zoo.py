"""The configs that ship inside the package, found by name (as ``detectron2.model_zoo`` does for
Detectron2's own configs).

``regionspot/configs`` holds every yaml of the repository's ``configs/`` folder: in a
checkout it is a link to that folder (the one source; nothing is copied into git), and a wheel
or an sdist built from the checkout carries the files themselves. The configs sit together, so
their ``_BASE_`` chains (resolved by Detectron2 relative to the yaml's own folder) work from
wherever the package is installed.

Every ``--config-file`` of the project's commands goes through :func:`resolve_config_file`: a path
to an existing file is used as it is; otherwise a bundled config's name (``regionspot_bl.yaml``,
``regionspot_bl``, or ``configs/regionspot_bl.yaml`` as the README writes it in a checkout) gives
the bundled file.

Nothing heavy is imported here (no torch, no Detectron2).
"""

import os
from typing import List

__all__ = ["CONFIG_DIR", "get_config_file", "list_config_files", "resolve_config_file"]

#: The folder of the bundled configs (inside the installed package).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

_PREFIX = "configs/"


def list_config_files() -> List[str]:
    """The bundled configs' names (``"regionspot_bl.yaml"``, ...), sorted; empty if the package
    was installed without its configs."""
    try:
        return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    except OSError:
        return []


def _bundled_name(name: str) -> str:
    name = name.replace(os.sep, "/")
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    if name and not name.endswith(".yaml"):
        name += ".yaml"
    return name


def get_config_file(name: str) -> str:
    """The absolute path of a bundled config.

    Args:
        name: a bundled config's file name, with or without ``.yaml`` and with or without a
            leading ``configs/`` (``"regionspot_bl.yaml"``, ``"regionspot_bl"``,
            ``"configs/regionspot_bl.yaml"``).

    Returns:
        The path of the file in :data:`CONFIG_DIR`.

    Raises:
        FileNotFoundError: no bundled config has that name (the message lists the names).
    """
    bundled = _bundled_name(str(name))
    if bundled and "/" not in bundled:
        path = os.path.join(CONFIG_DIR, bundled)
        if os.path.isfile(path):
            return path
    names = list_config_files()
    listed = ", ".join(os.path.splitext(n)[0] for n in names) if names else "none (installed without configs)"
    raise FileNotFoundError(f"{name!r} is not one of the bundled configs: {listed}")


def resolve_config_file(value: str) -> str:
    """A ``--config-file`` value as a file to read: ``value`` itself when it is an existing file,
    else the bundled config of that name (:func:`get_config_file`).

    Raises:
        FileNotFoundError: neither a file nor a bundled config's name (one line naming ``value``).
    """
    value = os.path.expanduser(str(value))
    if os.path.isfile(value):
        return value
    try:
        return get_config_file(value)
    except FileNotFoundError:
        names = list_config_files()
        hint = f" (the bundled ones: {', '.join(n for n in names)})" if names else ""
        raise FileNotFoundError(f"config file not found: {value!r} is neither a file nor the name of a bundled "
                                f"config{hint}") from None
