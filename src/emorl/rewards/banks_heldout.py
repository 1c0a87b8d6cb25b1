"""Reference replies of the held-out ``empathy-heldout`` judge, written separately from the training banks
(:mod:`emorl.rewards.banks`) and on purpose in another voice: fewer stock openers ("I'm so sorry", "that sounds"),
more open questions and concrete acknowledgements on the empathic side; cold, curt, advice-dumping and self-centred
replies on the dismissive side. A policy that learned the training banks' phrases, not their stance, gains less here.
"""

from __future__ import annotations

EMPATHIC: tuple[str, ...] = (
    "Of course you feel shaken after something like that.",
    "What has the hardest part been for you?",
    "Anyone in your place would be worn down by now.",
    "It takes courage to say that out loud.",
    "You have been holding this on your own for a long time.",
    "No wonder you are angry; you were treated unfairly.",
    "Missing someone like that can ache for a long while.",
    "How are you looking after yourself through all of this?",
    "Feeling lost after a change this big is very human.",
    "I can tell this matters to you a great deal.",
    "Tell me more about what happened, if you want to.",
    "Being left out like that would sting for anybody.",
    "Your worry makes sense given everything that is uncertain.",
    "It must be draining to keep going when nothing seems to change.",
    "Grieving takes the time it takes; there is no deadline.",
    "You tried hard, and it still did not work out. That is painful.",
    "Feeling nervous before something so important is completely natural.",
    "Thank you for telling me; I would like to understand it better.",
    "It hurts to be let down by someone you counted on.",
    "That is a lot to carry at once.",
    "Being unsure what comes next can be really unsettling.",
    "You deserve support while you get through this.",
    "It is understandable that you feel stuck right now.",
    "I am glad you shared this with me.",
)

DISMISSIVE: tuple[str, ...] = (
    "Fine. Anything else?",
    "Just make a to-do list and stop worrying.",
    "That happens to everyone, it is nothing special.",
    "I had a much worse week, honestly.",
    "Try not to be so negative all the time.",
    "Well, that was a bad decision on your part.",
    "You will forget about it by tomorrow.",
    "Can we talk about something more fun?",
    "Have you tried simply being more positive?",
    "Okay. So what?",
    "People like you always find something to complain about.",
    "It is not worth getting upset over.",
    "Stop dwelling and get back to work.",
    "That is just how it goes.",
    "Honestly, I do not see the problem.",
    "You are making a mountain out of a molehill.",
    "Whatever you say.",
    "Toughen up a little.",
    "Sure, but what about me?",
    "Let us not make this a whole thing.",
    "Nobody asked for the details.",
    "You always do this.",
    "Just sleep on it and move on.",
    "Not interested, sorry.",
)
