"""The learner: feedback -> preference pairs -> DPO/KTO on a per-user LoRA -> gate -> promotion.

Knows nothing of the chat UI. Entry points: ``learner.run.learn_user`` (one
user, under the user's lease) and ``learner.run.learn_all`` (every user with
enough new feedback); ``learner.schedule`` runs them on a timer and
``learner.export`` writes a user's examples in TRL's dataset formats.

- ``pairs``: every row of DESIGN.md's feedback table -> dpo / kto / sft examples, split once into train and held-out;
- ``train``: trl DPOTrainer (DPO loss + SFT term) and KTOTrainer on the user's adapter;
- ``gate``: judges the candidate by what it generates against the active adapter;
- ``run``: lease, temp folder, rename, one store transaction; crash-safe at every step.
"""
