"""How identity enters each base model: one module per base model, plus the sampler hook."""
