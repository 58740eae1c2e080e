"""Annotation readers: each turns a dataset's annotation files into `ObjectRecord`s (no pixels read).

A source validates its files before returning anything, so a file that is not what it claims
(not JSON, missing CSV columns) stops the job with `SourceError` before any shard is written;
single bad rows and annotations are dropped and counted in a `SourceReport` instead.
"""

from __future__ import annotations


class SourceError(ValueError):
    """An annotation file that cannot be used at all; the message names the file and the problem."""
