"""python part4/data/make_dataset.py

Writes ``train.jsonl`` and ``heldout.jsonl`` next to this file, deterministically (the same
files on every run and machine), from the facts below. Each fact is a passage copied word
for word from one of the makerspace documents in ``part3/data/docs``, a question that
passage answers, and the answer: a short span copied from the passage.

Each example shows the model two passages, each labelled with its file name: the one that
answers and a distractor from another document, in either order. The reply the task wants
is one JSON object naming the answer and the file it came from::

    {"answer": "30 days", "source": "faq.md"}

Every third fact goes to the held-out split, so its questions are never seen in training
(a few passages recur there with another question); each training fact appears twice, with
two different distractors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 13
SYSTEM = (
    "Answer the question from the passages. Reply with only a JSON object: "
    '{"answer": "<short answer copied from a passage>", "source": "<file name of that passage>"}'
)

# (file, passage copied from the document, question, answer copied from the passage)
FACTS = [
    (
        "membership.md",
        "Tidewater Makerspace is a community workshop at 14 Harbor Street, run by its members as a non-profit co-operative.",
        "What is the address of the makerspace?",
        "14 Harbor Street",
    ),
    (
        "membership.md",
        "Anyone over 16 can join; members aged 16 or 17 need a signed form from a parent or guardian.",
        "What do members aged 16 or 17 need?",
        "a signed form from a parent or guardian",
    ),
    (
        "membership.md",
        "Prices include the use of hand tools and the electronics bench.",
        "What do membership prices include?",
        "the use of hand tools and the electronics bench",
    ),
    (
        "membership.md",
        "Materials for the laser cutter and the 3D printers are paid separately, at cost, in the shop on the first floor.",
        "Where are laser cutter materials paid for?",
        "in the shop on the first floor",
    ),
    (
        "membership.md",
        "A Full member may bring up to two guests at a time.",
        "How many guests may a Full member bring?",
        "up to two guests at a time",
    ),
    (
        "membership.md",
        "Guests sign the visitor book at the front desk, stay with their host, and may not use the laser cutter or the wood lathe.",
        "Which machines may guests not use?",
        "the laser cutter or the wood lathe",
    ),
    (
        "membership.md",
        "Members can pause their membership for up to three months a year, for example over the summer, at no cost.",
        "For how long can members pause their membership?",
        "up to three months a year",
    ),
    (
        "membership.md",
        "Cancelling needs one month's notice, sent by email to membership@tidewater.example.",
        "Where do I send my cancellation?",
        "membership@tidewater.example",
    ),
    (
        "membership.md",
        "Key fobs must be returned within 14 days of cancelling, or a 15 euro replacement fee is charged.",
        "How long do I have to return my key fob after cancelling?",
        "within 14 days",
    ),
    (
        "membership.md",
        "Key fobs must be returned within 14 days of cancelling, or a 15 euro replacement fee is charged.",
        "What is charged if a key fob is not returned?",
        "a 15 euro replacement fee",
    ),
    (
        "safety_rules.txt",
        'Inductions are given by a trained member (a "host") and are recorded on the induction board next to the kitchen.',
        "Where are inductions recorded?",
        "on the induction board next to the kitchen",
    ),
    (
        "safety_rules.txt",
        "The laser cutter induction takes 90 minutes; the table saw induction takes two hours and is only given to members who have been with us for at least one month.",
        "How long does the table saw induction take?",
        "two hours",
    ),
    (
        "safety_rules.txt",
        "The laser cutter induction takes 90 minutes; the table saw induction takes two hours and is only given to members who have been with us for at least one month.",
        "How long does the laser cutter induction take?",
        "90 minutes",
    ),
    (
        "safety_rules.txt",
        "The table saw, the wood lathe and the metal lathe may only be used when a second person is in the same room.",
        "When may the metal lathe be used?",
        "when a second person is in the same room",
    ),
    (
        "safety_rules.txt",
        "Working alone after 22:00 is not allowed on any machine.",
        "After what time is working alone not allowed?",
        "after 22:00",
    ),
    (
        "safety_rules.txt",
        "PVC, vinyl and anything containing chlorine must never be cut: the fumes are toxic and they destroy the machine's optics.",
        "Which materials must never be cut with the laser?",
        "PVC, vinyl and anything containing chlorine",
    ),
    (
        "safety_rules.txt",
        "The CO2 fire extinguisher for the laser is mounted on the wall to the left of the machine.",
        "Where is the fire extinguisher for the laser?",
        "on the wall to the left of the machine",
    ),
    (
        "safety_rules.txt",
        "Safety glasses are required in the wood shop and the metal shop at all times.",
        "Where are safety glasses required?",
        "in the wood shop and the metal shop",
    ),
    (
        "safety_rules.txt",
        "Hearing protection is required when the planer or the dust extractor is running.",
        "When is hearing protection required?",
        "when the planer or the dust extractor is running",
    ),
    (
        "safety_rules.txt",
        "The first aid kit is in the kitchen, above the sink.",
        "Where is the first aid kit?",
        "in the kitchen, above the sink",
    ),
    (
        "safety_rules.txt",
        "The defibrillator (AED) hangs by the front door.",
        "Where is the defibrillator?",
        "by the front door",
    ),
    (
        "safety_rules.txt",
        "The last person to leave switches off the main breaker for the workshop, which is the red switch by the back door, and checks that the laser cutter's air filter is off.",
        "Where is the main breaker for the workshop?",
        "the red switch by the back door",
    ),
    (
        "faq.md",
        "The network is called `tidewater-members` and the password is printed on the back of your key fob.",
        "Where is the wifi password?",
        "printed on the back of your key fob",
    ),
    (
        "faq.md",
        "Visitors use the open `tidewater-guest` network, which is limited to 5 Mbit/s.",
        "How fast is the guest network?",
        "limited to 5 Mbit/s",
    ),
    (
        "faq.md",
        "There is no car park. Bicycles can be locked in the courtyard behind the building.",
        "Where can bicycles be locked?",
        "in the courtyard behind the building",
    ),
    (
        "faq.md",
        "The nearest public car park is the Quayside multi-storey, a five-minute walk away.",
        "What is the nearest public car park?",
        "the Quayside multi-storey",
    ),
    (
        "faq.md",
        "Full members get a labelled storage box on the shelves in the hallway.",
        "What storage do Full members get?",
        "a labelled storage box",
    ),
    (
        "faq.md",
        "Large projects may stay on the project table for at most seven days; after that, they are moved to the basement and a note is sent to the owner.",
        "How long may a large project stay on the project table?",
        "at most seven days",
    ),
    (
        "faq.md",
        "Large projects may stay on the project table for at most seven days; after that, they are moved to the basement and a note is sent to the owner.",
        "Where are old projects moved to?",
        "to the basement",
    ),
    (
        "faq.md",
        "Lost property is kept in the blue crate under the front desk for 30 days, then donated to the repair café.",
        "How long is lost property kept?",
        "30 days",
    ),
    (
        "faq.md",
        "Lost property is kept in the blue crate under the front desk for 30 days, then donated to the repair café.",
        "Where is lost property kept?",
        "in the blue crate under the front desk",
    ),
    (
        "faq.md",
        'Write it on the whiteboard in the hallway and tag the machine with a red "out of order" card.',
        "How do I tag a broken machine?",
        'with a red "out of order" card',
    ),
    (
        "faq.md",
        "The tool wardens check the whiteboard every Monday evening.",
        "When do the tool wardens check the whiteboard?",
        "every Monday evening",
    ),
    (
        "history.txt",
        "Tidewater began in 2011 in the garage of Marta Okonkwo, a retired ship's engineer, who invited six neighbours to share her lathe, her drill press and her coffee every Thursday night.",
        "In whose garage did Tidewater begin?",
        "Marta Okonkwo",
    ),
    (
        "history.txt",
        "Tidewater began in 2011 in the garage of Marta Okonkwo, a retired ship's engineer, who invited six neighbours to share her lathe, her drill press and her coffee every Thursday night.",
        "In which year did Tidewater begin?",
        "2011",
    ),
    (
        "history.txt",
        'The group called itself "the Thursday Club" for its first two years.',
        "What did the group call itself at first?",
        "the Thursday Club",
    ),
    (
        "history.txt",
        "In 2013 the club rented a former sail loft on Canal Row and took the name Tidewater Makerspace, after the tide tables that still hung on the loft's walls.",
        "What did the club rent in 2013?",
        "a former sail loft on Canal Row",
    ),
    (
        "history.txt",
        "Membership grew from twenty to ninety people in that building.",
        "How many members were there in the sail loft at the end?",
        "ninety people",
    ),
    (
        "history.txt",
        "In 2016 the sail loft was sold, and the members moved to the present building at 14 Harbor Street, a former fish market with a high roof and a loading bay.",
        "What was the present building before?",
        "a former fish market",
    ),
    (
        "history.txt",
        "The move was paid for by a crowdfunding campaign that raised 41,000 euros from 612 backers.",
        "How much did the crowdfunding campaign raise?",
        "41,000 euros",
    ),
    (
        "history.txt",
        "The move was paid for by a crowdfunding campaign that raised 41,000 euros from 612 backers.",
        "How many backers did the crowdfunding campaign have?",
        "612 backers",
    ),
    (
        "history.txt",
        "The first laser cutter arrived in 2017.",
        "When did the first laser cutter arrive?",
        "in 2017",
    ),
    (
        "history.txt",
        "Marta Okonkwo stepped down as chair in 2021.",
        "When did Marta Okonkwo step down as chair?",
        "in 2021",
    ),
    (
        "history.txt",
        "The current chair is Jonas Lindqvist, who joined in 2014 as a student and still teaches the beginners' soldering workshop.",
        "Who is the current chair?",
        "Jonas Lindqvist",
    ),
    (
        "equipment.html",
        'Machines marked "booking" are reserved in the online calendar at book.tidewater.example.',
        "Where are machines reserved?",
        "in the online calendar at book.tidewater.example",
    ),
    (
        "equipment.html",
        "A booking can be at most three hours long, and each member may hold at most two future bookings for the same machine.",
        "How long can a booking be?",
        "at most three hours",
    ),
    (
        "equipment.html",
        "A booking can be at most three hours long, and each member may hold at most two future bookings for the same machine.",
        "How many future bookings may a member hold for one machine?",
        "at most two",
    ),
    (
        "equipment.html",
        "If you cannot use a booking, cancel it at least two hours before it starts.",
        "When must I cancel a booking I cannot use?",
        "at least two hours before it starts",
    ),
    (
        "equipment.html",
        "A member who misses three bookings in one month cannot book that machine for the next 30 days.",
        "What happens to a member who misses three bookings in one month?",
        "cannot book that machine for the next 30 days",
    ),
    (
        "equipment.html",
        "The laser cutter's lens and mirrors are cleaned every Sunday morning, so the laser cannot be booked on Sundays before noon.",
        "When can the laser not be booked?",
        "on Sundays before noon",
    ),
    (
        "equipment.html",
        "The 3D printers get new nozzles on the first day of each month.",
        "When do the 3D printers get new nozzles?",
        "on the first day of each month",
    ),
    (
        "workshops.md",
        "Workshops are taught by volunteers. Members pay half price; the rest of the fee goes to the materials fund.",
        "How much do members pay for workshops?",
        "half price",
    ),
    (
        "workshops.md",
        "Workshops are taught by volunteers. Members pay half price; the rest of the fee goes to the materials fund.",
        "Who teaches the workshops?",
        "volunteers",
    ),
    (
        "workshops.md",
        "You build a small blinking badge and take it home. Fee: 25 euros, materials included.",
        "What do you build in the soldering workshop?",
        "a small blinking badge",
    ),
    (
        "workshops.md",
        "**Laser cutter induction**: every Saturday at 10:00, four places each time, 90 minutes.",
        "When is the laser cutter induction?",
        "every Saturday at 10:00",
    ),
    (
        "workshops.md",
        "**Sharpening hand tools**: third Thursday of the month. Bring one chisel or plane iron.",
        "What should I bring to the sharpening workshop?",
        "one chisel or plane iron",
    ),
    (
        "workshops.md",
        "**Intro to CAD for 3D printing**: every second Wednesday, on the space's laptops, using free software. Fee: 20 euros.",
        "How much does the CAD workshop cost?",
        "20 euros",
    ),
    (
        "workshops.md",
        "On the last Sunday of each month, from 13:00 to 17:00, the ground floor becomes a repair café.",
        "When is the repair café?",
        "the last Sunday of each month, from 13:00 to 17:00",
    ),
    (
        "workshops.md",
        "It is free; donations go to the spare parts drawer.",
        "Where do repair café donations go?",
        "to the spare parts drawer",
    ),
    (
        "workshops.md",
        "Cancellations up to 48 hours before a workshop are refunded in full; later cancellations are not refunded, but you may send someone in your place.",
        "Until when is a workshop cancellation refunded in full?",
        "up to 48 hours before a workshop",
    ),
    (
        "workshops.md",
        "Cancellations up to 48 hours before a workshop are refunded in full; later cancellations are not refunded, but you may send someone in your place.",
        "What can I do instead of a late cancellation?",
        "send someone in your place",
    ),
    (
        "booking_rules.py",
        "The online calendar calls these functions before it accepts a booking.",
        "What calls the booking functions?",
        "The online calendar",
    ),
    ("booking_rules.py", "MAX_BOOKING_HOURS = 3", "What is MAX_BOOKING_HOURS?", "3"),
    ("booking_rules.py", "BLOCK_DAYS = 30", "What is BLOCK_DAYS?", "30"),
    (
        "booking_rules.py",
        "LASER_MAINTENANCE_END_HOUR = 12  # the laser is cleaned on Sunday mornings",
        "When is the laser cleaned?",
        "on Sunday mornings",
    ),
    (
        "booking_rules.py",
        "Cost in euros of a laser job: 0.50 euros per minute of cutting, rounded to cents.",
        "How much does a laser job cost per minute?",
        "0.50 euros per minute of cutting",
    ),
]


def example(fact: tuple[str, str, str, str], distractor: tuple, rng: random.Random) -> dict:
    """One chat example: the system instruction, two labelled passages and the question,
    and the JSON reply the task wants."""
    source, passage, question, answer = fact
    passages = [(source, passage), (distractor[0], distractor[1])]
    rng.shuffle(passages)
    text = "\n".join(f"[{name}] {body}" for name, body in passages)
    reply = json.dumps({"answer": answer, "source": source}, ensure_ascii=False)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{text}\nQuestion: {question}"},
            {"role": "assistant", "content": reply},
        ]
    }


def build() -> tuple[list[dict], list[dict]]:
    """The train and held-out examples (every third fact is held out)."""
    rng = random.Random(SEED)
    train, heldout = [], []
    for i, fact in enumerate(FACTS):
        others = [f for f in FACTS if f[0] != fact[0]]
        if i % 3 == 2:
            heldout.append(example(fact, rng.choice(others), rng))
        else:
            for distractor in rng.sample(others, 2):
                train.append(example(fact, distractor, rng))
    rng.shuffle(train)
    return train, heldout


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def main(argv: list[str] | None = None) -> int:
    train, heldout = build()
    write(train, HERE / "train.jsonl")
    write(heldout, HERE / "heldout.jsonl")
    print(f"{len(train)} training and {len(heldout)} held-out examples written to {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
