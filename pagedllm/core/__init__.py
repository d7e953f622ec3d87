"""CPU bookkeeping: requests, the paged block manager and the scheduler."""
