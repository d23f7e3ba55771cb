"""Booking rules for the machines at Tidewater Makerspace.

The online calendar calls these functions before it accepts a booking. They encode the
rules from the equipment page: a booking lasts at most MAX_BOOKING_HOURS, a member holds
at most MAX_FUTURE_BOOKINGS future bookings per machine, and three no-shows in a month
block a member from booking that machine for BLOCK_DAYS days.
"""

from datetime import datetime, timedelta

MAX_BOOKING_HOURS = 3
MAX_FUTURE_BOOKINGS = 2
NO_SHOW_LIMIT = 3
BLOCK_DAYS = 30
LASER_MAINTENANCE_END_HOUR = 12  # the laser is cleaned on Sunday mornings


def booking_allowed(machine: str, start: datetime, hours: float, future_bookings: int) -> bool:
    """Return True if a member may book ``machine`` from ``start`` for ``hours`` hours."""
    if hours <= 0 or hours > MAX_BOOKING_HOURS:
        return False
    if future_bookings >= MAX_FUTURE_BOOKINGS:
        return False
    is_sunday_morning = start.weekday() == 6 and start.hour < LASER_MAINTENANCE_END_HOUR
    return not (machine == "laser cutter" and is_sunday_morning)


def blocked_until(no_show_dates: list[datetime], now: datetime) -> datetime | None:
    """The date until which a member is blocked, or None if they may book.

    A member is blocked after NO_SHOW_LIMIT no-shows within the last 30 days; the block
    lasts BLOCK_DAYS days from the latest no-show.
    """
    recent = [d for d in no_show_dates if now - d <= timedelta(days=30)]
    if len(recent) < NO_SHOW_LIMIT:
        return None
    return max(recent) + timedelta(days=BLOCK_DAYS)


def laser_cost(minutes_cutting: float) -> float:
    """Cost in euros of a laser job: 0.50 euros per minute of cutting, rounded to cents."""
    return round(0.50 * minutes_cutting, 2)
