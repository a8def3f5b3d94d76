"""The bsread wire format, pure: headers, values, message building, the packed parts, a message's time."""
