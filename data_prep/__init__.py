"""Offline data pipelines: COCO / OpenImages object crops with masks and boxes into WebDataset shards.

Stages (img2dataset-style, one job each): `sources/` read annotation files into plain records,
`crops` holds the pure geometry, `objects` turns a record into crop + mask + metadata, `writer`
writes resumable deterministic shards and manifests, `inspect_shards` draws a contact sheet.
Command line: `python -m data_prep --help`.
"""

import encoders  # noqa: F401  (first: installs transformers' image-processor log filter)
