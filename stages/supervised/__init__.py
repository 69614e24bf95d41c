"""What `rl3d sft` (stages/sft.py) runs: supervised training of a policy on objects tables, in gen's
sequence layout. options.py (SFTOptions, the --config shapes), data.py (objects -> packed sequences,
the data order), model.py (the model, tokenizer, codec, loss, optimizer), trainer.py (the loop),
checkpoints.py (the run folder, resume, the exported final/), metrics.py."""
