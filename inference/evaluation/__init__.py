"""Evaluation, in a room of its own: each paper's protocol run over every generation method.

- `protocols`: each paper's evaluation as data (prompts, images per prompt, each method's sampler, measures);
- `config`: `EvalConfig`, the keys of `python -m inference.evaluate`;
- `prompts`: DreamBooth's prompt lists, the CoI and generic prompts;
- `plan`: the concepts and runs, and the rows (method x concept x sampling) in table order;
- `generation`: each row's images through its method (`inference.methods`), from the same seeded noise;
- `scoring`, `metrics`: CLIP-T, CLIP-I, DINO-I, the CoI detector; `overfitting`: latent Fisher and W2;
- `report`: the table and the files; `evaluator`: one protocol or all, and the command line;
- `demo_report`: what `make demo` made and where.

Adding a protocol: a `Protocol` in `protocols.py` (and its prompts in `prompts.py` if new). Adding a method: a
class in `inference.methods`; the evaluation then gives it rows unchanged.
"""
