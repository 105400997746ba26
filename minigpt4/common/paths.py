"""Joining a folder with a file name read from a data file, without leaving the folder.

An annotation's `image_id`, a POPE question's `image` or a CHAIR list entry such as `../../x` or `/home/u/x.jpg`
would, joined as is, read a file outside the configured image folder (`os.path.join` even lets an absolute
name replace the folder), silently. Every such join goes through `join_inside`.
"""
from __future__ import annotations

import os

from minigpt4.common.config import ConfigError


class OutsideFolderError(ConfigError):
    """A file name from a data file that leaves its folder; the message names the file and the entry."""


def join_inside(folder: str | os.PathLike, name: str, *, entry: str, option: str | None,
                allow: bool = False) -> str:
    """`folder`/`name`, refusing a `name` that is absolute or climbs out with ".." unless `allow`.

    The check is on the name's text, not on resolved links, so a folder of symlinks (an HF cache, a linked
    dataset) still works. `entry` says where the name came from (file and entry); `option` is the setting
    that sets `allow`, named in the message, or None where there is none.
    """
    normal = os.path.normpath(name)
    leaves = os.path.isabs(name) or normal == os.pardir or normal.startswith(os.pardir + os.sep)
    if leaves and not allow:
        fix = (f"set {option}: true if the data really lives there" if option is not None
               else "use a plain file name inside the folder")
        raise OutsideFolderError(f"{entry}: image {name!r} is outside the image folder {folder} (an absolute path "
                                 f"or one that climbs out with '..'); {fix}")
    return os.path.join(folder, name)
