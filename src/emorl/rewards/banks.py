"""Reference replies for the ``empathy`` proxy, written for emorl (no external data).

Empathic replies name or validate the person's feeling, show care, or invite them to say more. Dismissive
replies minimise, blame, change the subject or brush the person off. Both sets are deliberately varied in
topic so that the contrast is about *stance*, not subject matter. Users can pass their own lists with the
``empathic`` / ``dismissive`` options of the ``empathy`` reward.
"""

from __future__ import annotations

EMPATHIC: tuple[str, ...] = (
    "I'm so sorry you're going through this; it sounds really painful.",
    "That sounds incredibly hard, and it makes sense that you feel this way.",
    "It sounds like you're carrying a lot right now. I'm here for you.",
    "I can hear how much this is hurting you.",
    "Your feelings are completely valid; anyone would struggle with this.",
    "That must be exhausting. Thank you for trusting me with it.",
    "I'm really sorry. Losing someone you love is one of the hardest things there is.",
    "It sounds like you feel alone with this, and that is a heavy place to be.",
    "I understand why you're upset; that would frustrate me too.",
    "It's okay to feel overwhelmed. Would you like to tell me more about what's been happening?",
    "You've been through so much, and it's understandable that you're worn out.",
    "I'm sorry it's been such a difficult time. How are you holding up?",
    "That sounds frightening. It's natural to feel anxious when things are so uncertain.",
    "It hurts when people we care about let us down. I'm sorry that happened to you.",
    "You don't have to go through this by yourself; I'm listening.",
    "It sounds like you're being really hard on yourself, and you deserve some kindness too.",
    "I can imagine how disappointing that was after all the effort you put in.",
    "What you're feeling is real and it matters.",
    "That sounds lonely, and I'm glad you reached out.",
    "It makes sense that you're scared; this is a big change.",
    "I'm sorry you feel so stressed. It sounds like there's a lot on your plate.",
    "It's completely understandable to feel angry about being treated that way.",
    "I hear you. Grief doesn't follow a schedule, and it's okay to still be sad.",
    "That sounds really discouraging, but it doesn't make you a failure.",
    "I'm here with you. Take all the time you need.",
    "It sounds like you miss them very much.",
    "Feeling lost like this is so hard. I'm sorry you're dealing with it.",
    "I can tell how much you care, and how much this is weighing on you.",
)

DISMISSIVE: tuple[str, ...] = (
    "Whatever, deal with it.",
    "Just get over it.",
    "That's not a big deal at all.",
    "Stop complaining, other people have it way worse.",
    "You're overreacting.",
    "It's your own fault, honestly.",
    "I don't really care about that.",
    "Why are you telling me this?",
    "Everyone goes through that, so stop whining.",
    "Man up and move on.",
    "That's boring. Anyway, what's for dinner?",
    "Nobody wants to hear about your problems.",
    "Calm down, it's not the end of the world.",
    "You should have known better.",
    "Just stop thinking about it.",
    "Sounds like a you problem.",
    "So what? Life goes on.",
    "You're being too sensitive.",
    "Meh. Did you watch the game last night?",
    "Not my business.",
    "Ugh, you're so dramatic.",
    "That's life, get used to it.",
    "Cry me a river.",
    "Well, you brought it on yourself.",
    "I have better things to do than listen to this.",
    "Just be happy, it's a choice.",
    "OK. Next topic.",
    "Lol, that's what you get.",
)
