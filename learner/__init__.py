"""The learner: feedback -> preference pairs -> DPO/KTO on a per-user LoRA -> gate -> promotion.

Knows nothing of the chat UI. Entry points: ``learner.run.learn_user`` and
``learner.run.learn_all``; ``learner.schedule`` runs them on a timer.
"""
