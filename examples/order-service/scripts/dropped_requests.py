"""Normal load plus dropped requests against a running order service (issue 9's measurement).

Usage: python3 dropped_requests.py PORT SECONDS
6 clients post orders one after another (acme); 32 clients send a whole POST and close the
socket with a reset 0-20 ms later (globex), again and again. Prints the counts as JSON.
See dropped_requests.sh for the whole run on PostgreSQL.
"""
import json, random, socket, sys, threading, time, uuid, http.client
port = int(sys.argv[1]); seconds = float(sys.argv[2])
stop = time.time() + seconds
stats = {"ok": 0, "other": {}, "dropped": 0}
lock = threading.Lock()
def body(ref):
    return json.dumps({"reference": ref, "items": [{"sku": "sku-apple", "quantity": 1}]})
def normal(i):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    n = 0
    while time.time() < stop:
        ref = f"n-{i}-{n}"; n += 1
        conn.request("POST", "/orders", body(ref), {"authorization": "Bearer token-acme", "content-type": "application/json"})
        r = conn.getresponse(); r.read()
        with lock:
            if r.status == 201: stats["ok"] += 1
            else: stats["other"][r.status] = stats["other"].get(r.status, 0) + 1
def dropper(i):
    n = 0
    while time.time() < stop:
        ref = f"d-{i}-{n}-{uuid.uuid4().hex[:6]}"; n += 1
        b = body(ref).encode()
        req = (f"POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer token-globex\r\n"
               f"content-type: application/json\r\ncontent-length: {len(b)}\r\n\r\n").encode() + b
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        time.sleep(random.uniform(0, 0.02))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        with lock: stats["dropped"] += 1
threads = [threading.Thread(target=normal, args=(i,)) for i in range(6)] + [threading.Thread(target=dropper, args=(i,)) for i in range(32)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(stats))
