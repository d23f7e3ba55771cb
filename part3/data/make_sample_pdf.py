"""python part3/data/make_sample_pdf.py  -- rebuild docs/annual_report_2024.pdf from the text below.

The sample corpus needs one PDF with real, extractable text on more than one page. It is
drawn with matplotlib using the PDF standard fonts (nothing embedded), which pypdf reads
back exactly. Run it again after editing PAGES; the output is the same byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

OUT = Path(__file__).with_name("docs") / "annual_report_2024.pdf"

PAGES = [
    (
        "Tidewater Makerspace - Annual Report 2024",
        [
            "Members. The makerspace ended 2024 with 214 paying members, up from 187 at "
            "the end of 2023. Of these, 96 hold a Full membership, 71 are Hobbyists and 47 "
            "are Students. Day passes were sold 1,130 times during the year.",
            "Volunteering. Members logged 3,870 volunteer hours: teaching workshops, "
            "hosting inductions, running the repair cafe and keeping the machines in order. "
            "The volunteer of the year is Priya Raman, who ran 41 laser cutter inductions.",
            "Repair cafe. Twelve repair cafes were held. Volunteers looked at 506 broken "
            "items and repaired 371 of them, a success rate of 73 percent. Lamps and coffee "
            "machines were the most common repairs.",
        ],
    ),
    (
        "Finances and plans",
        [
            "Income. Total income was 162,400 euros: 118,900 from memberships, 21,300 from "
            "workshops, 14,600 from day passes and 7,600 from donations and grants.",
            "Spending. Rent for 14 Harbor Street was the largest cost at 66,000 euros. "
            "Electricity cost 19,800 euros, 22 percent more than in 2023, mostly because "
            "of the new dust extraction system in the wood shop.",
            "Plans for 2025. The general assembly voted to install solar panels on the "
            "roof, budgeted at 38,000 euros, to cut the electricity bill. A second laser "
            "cutter will be bought if the waiting list for laser bookings stays above two "
            "weeks through the spring.",
        ],
    ),
]


def draw_page(pdf: PdfPages, title: str, paragraphs: list[str], number: int) -> None:
    """Write one A4 page: a title, wrapped paragraphs and a page number."""
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.1, 0.93, title, fontsize=16, weight="bold")
    y = 0.87
    for paragraph in paragraphs:
        lines = textwrap.wrap(paragraph, width=80)
        for line in lines:
            fig.text(0.1, y, line, fontsize=11)
            y -= 0.022
        y -= 0.02
    fig.text(0.5, 0.05, f"page {number}", fontsize=9, ha="center")
    pdf.savefig(fig)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write the PDF and print where it went."""
    parser = argparse.ArgumentParser(
        description="Draw the sample annual report as a two-page PDF with extractable text.",
        epilog="example:\n  python part3/data/make_sample_pdf.py --out /tmp/report.pdf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where to write it (default: {OUT.name} in docs/)"
    )
    args = parser.parse_args(argv)
    # The PDF standard fonts have no separate "normal" weight; matplotlib says so on every text.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    style = {"pdf.use14corefonts": True, "font.family": "sans-serif"}
    # No creation date, so rebuilding gives an identical file.
    with plt.rc_context(style), PdfPages(args.out, metadata={"CreationDate": None}) as pdf:
        for number, (title, paragraphs) in enumerate(PAGES, start=1):
            draw_page(pdf, title, paragraphs, number)
        pdf.infodict()["Title"] = PAGES[0][0]
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
