"""``emorl judge``: blind human A/B evaluation of a run's evaluated replies.

People compare two methods' replies to the same prompt (same seed) without knowing which method wrote which;
sides and order are random (seeded and recorded). Answers go to ``RUN/judge/answers.jsonl``; ``--score`` counts
wins, ties and losses per pair and criterion with an exact sign test and a Wilson interval
(``RUN/judge/summary.json``, shown by ``emorl report``). Files: :mod:`~emorl.judge.store` (the plan and the
answers), :mod:`~emorl.judge.stats` (the statistics), :mod:`~emorl.judge.app` (the page's server),
:mod:`~emorl.judge.page` (the self-contained HTML file), :mod:`~emorl.judge.cli` (the command).
"""
