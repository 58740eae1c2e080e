"""The ground floor: helpers and on-disk contracts every package of the project may import.

Nothing here imports another part of the project (not even the rest of `encoders`), so
`data_prep`, `encoders`, `inference` and `training` can all build on it without an import circle:

- `config`: typed run configs (dataclass defaults, a YAML file, `key=value` overrides).
- `files`: atomic writes (temporary name, then rename) with the usual permissions.
- `device`: choosing a device and a dtype, and the `from_pretrained` dtype keyword.
- `processes`: how many worker processes a job may start (the cores it is given).
- `shards`: the shard contract: file names, manifest, shard specs, crop / pair / latent members.
- `finetune_folder`: what a per-concept fine-tune's output folder holds (`concept.json`, result files).
- `images`: image file suffixes, a folder's photos and the mask beside each photo.
- `version`: this project's installed version, recorded in what it writes.
- `hub`: a local path or a Hub id (repo or file), resolved one way everywhere.
"""
