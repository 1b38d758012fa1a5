"""Stage 3, global alignment: fine-tune the aggregated model on D_align with CE + beta * KL to CLIP.

`teacher` (the CLIP teacher, also used by CLIP2FL's clients), `logits` (its logits on D_align, from a
file or computed once and cached), `loss` (the loss and the fine-tuning loop), `stage` (the
after-aggregation stage and its input checks) and `figure` (confusion matrices side by side). Importing this
package imports none of them, so a client that needs only the teacher loads nothing else.
"""
