"""Zero-shot evaluation of SAM-type models with simulated prompts (`samunet_zeroshot`)."""
