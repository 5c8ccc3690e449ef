"""T2I-CompBench on real models: ``realign eval --benchmark t2i-compbench``.

``options`` (the command's options), ``plan`` (prompts, file names, seeds, shards), ``configurations`` (the
ablation's rows), ``run`` (resumable generation and scoring), ``scorers`` (the official scores through
transformers models), ``spatial`` (T2I-CompBench's spatial rule), ``report`` and ``command`` (the entry).
Nothing is imported here, so building ``realign``'s parser stays free of torch.
"""
