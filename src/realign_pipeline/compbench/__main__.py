"""``python -m realign_pipeline.compbench`` / ``accelerate launch -m realign_pipeline.compbench``."""

from .command import main

main()
