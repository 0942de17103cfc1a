"""Speculative MoE inference with expert prefetching (SP-MoE) on Ray.

A dense draft model drafts tokens; its attention output at each layer is scored
by the Mixtral target's router of the same layer to predict which experts the
target's verification pass will need, and those experts are fetched from expert
host actors into a bounded cache while drafting continues (Chen et al., "SP-MoE:
Speculative Decoding and Prefetching for Accelerating MoE-based Model
Inference", 2025). See ``docs/moe.md``.
"""
