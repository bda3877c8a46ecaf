"""LoRA fine-tuning of a SAM teacher on a dataset's masks (``tools/finetune_teacher.py``): the config
(:mod:`.config`), the prompted-mask data and prompt sampler (:mod:`.prompts`), the LoRA adapters
(:mod:`.lora`) and the loop with its validation and checkpoints (:mod:`.loop`)."""
