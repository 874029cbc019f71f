"""The MOHAWK verifier: three alignment objectives, one stage runner, reports.

Stage 1 (per node): student mixing matrix vs teacher attention probabilities.
Stage 2 (per block): student block vs teacher block output on the teacher's input.
Stage 3 (end to end): KL / cross-entropy to the teacher's logits.
(Bick et al., "Transformers to SSMs: Distilling Quadratic Knowledge to
Subquadratic Models", arXiv 2408.10189.)
"""
