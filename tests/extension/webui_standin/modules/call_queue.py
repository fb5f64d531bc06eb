import threading

# A1111: threading.Lock(); Forge: a FIFO lock with the same context-manager use. Neither is re-entrant.
queue_lock = threading.Lock()
