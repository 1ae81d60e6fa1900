"""ThingsBoard's own Python device SDK (tb-mqtt-client) against a thingraft node.

Usage: python3 tb_sdk.py HOST MQTT_PORT HTTP_PORT
Each check prints "ok <name>"; the first failing check raises (exit code 1). The user side
(creating devices, shared attributes, RPC calls) goes through the REST API with urllib.
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request

from tb_device_http import TBHTTPDevice
from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo
from tb_gateway_mqtt import TBGatewayMqttClient

HOST, MQTT, HTTP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BASE = f"http://{HOST}:{HTTP}"


def rest(method, path, body=None, jwt=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if jwt:
        req.add_header("X-Authorization", "Bearer " + jwt)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        return e.code, (json.loads(text) if text else None)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok", name, flush=True)


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


_, login = rest("POST", "/api/auth/login", {"username": "tenant@thingsboard.org", "password": "tenant"})
JWT = login["token"]


def create(name, token, extra=None):
    body = {"name": name, "type": "default"}
    body.update(extra or {})
    code, d = rest("POST", f"/api/device?accessToken={token}", body, JWT)
    assert code == 200, (code, d)
    return d["id"]["id"]


def latest(dev_id, keys):
    _, v = rest("GET", f"/api/plugins/telemetry/DEVICE/{dev_id}/values/timeseries?keys={keys}", None, JWT)
    return v or {}


# --- device over MQTT ---------------------------------------------------------------------
dev_id = create("SDK device", "SDK_TOKEN")
client = TBDeviceMqttClient(HOST, port=MQTT, username="SDK_TOKEN")
client.connect(timeout=30)
check("mqtt connect and rate limits received", wait_for(client.is_connected, 15))

# send_telemetry_pack: 100 messages, each acknowledged.
results = [client.send_telemetry({"ts": 1700000000000 + i, "values": {"seq": i, "temp": 20.5}}) for i in range(100)]
codes = [r.get() for r in results]
check("telemetry pack: 100 PUBACKs", all(c == TBPublishInfo.TB_ERR_SUCCESS for c in codes), codes)
check("telemetry stored", wait_for(lambda: latest(dev_id, "seq").get("seq", [{}])[0].get("value") == "99"))
check("plain telemetry", client.send_telemetry({"humidity": 40}).get() == TBPublishInfo.TB_ERR_SUCCESS)

check("attributes publish", client.send_attributes({"fwVersion": "v1.0", "slots": 4}).get() == TBPublishInfo.TB_ERR_SUCCESS)
rest("POST", f"/api/plugins/telemetry/{dev_id}/SHARED_SCOPE", {"targetTemp": 21}, JWT)

got = {}
ev = threading.Event()


def on_attrs(result, exception=None):
    got["attrs"] = result
    ev.set()


client.request_attributes(["fwVersion"], ["targetTemp"], callback=on_attrs)
check("attribute request", ev.wait(10) and got["attrs"] == {"client": {"fwVersion": "v1.0"}, "shared": {"targetTemp": 21}}, got)
ev.clear()
client.request_attributes(callback=on_attrs)
check("attribute request {} means all", ev.wait(10) and "slots" in got["attrs"].get("client", {}), got)

pushed = []
client.subscribe_to_all_attributes(lambda result, *args: pushed.append(result))
time.sleep(0.5)
rest("POST", f"/api/plugins/telemetry/{dev_id}/SHARED_SCOPE", {"targetTemp": 23}, JWT)
check("shared attribute push", wait_for(lambda: any(p.get("targetTemp") == 23 for p in pushed)), pushed)


def on_rpc(req_id, body):
    client.send_rpc_reply(req_id, {"echo": body["params"]})


client.set_server_side_rpc_request_handler(on_rpc)
time.sleep(0.3)
code, answer = rest("POST", f"/api/plugins/rpc/twoway/{dev_id}", {"method": "ping", "params": {"n": 7}}, JWT)
check("server-side RPC answered by the SDK", code == 200 and answer == {"echo": {"n": 7}}, (code, answer))

# Client-side RPC, as the SDK's client_rpc_request example makes it: the default root chain
# answers `getTime` with the server time.
client_answers = []
client.send_rpc_call("getTime", {}, lambda req_id, result, exception=None: client_answers.append(result))
check("client-side getTime answered by the root chain",
      wait_for(lambda: client_answers and "GMT+0000" in str(client_answers[0].get("time"))), client_answers)

check("claim", client.claim(secret_key="sdk-secret", duration=60000).get() == TBPublishInfo.TB_ERR_SUCCESS)
client.disconnect()

# --- OTA firmware over MQTT: uploaded, assigned, fetched in chunks, checksum verified ---------
FW = bytes((i * 7) % 251 for i in range(10000))
code, pkg = rest("POST", "/api/otaPackage", {"title": "sdk-fw", "version": "2.0", "type": "FIRMWARE"}, JWT)
assert code == 200, (code, pkg)
up = urllib.request.Request(f"{BASE}/api/otaPackage/{pkg['id']['id']}?checksumAlgorithm=SHA256&fileName=sdk-fw.bin",
                            data=FW, method="POST")
up.add_header("Content-Type", "application/octet-stream")
up.add_header("X-Authorization", "Bearer " + JWT)
with urllib.request.urlopen(up, timeout=30) as r:
    pkg = json.loads(r.read().decode())
check("OTA package uploaded with its checksum", pkg["dataSize"] == len(FW) and pkg["checksumAlgorithm"] == "SHA256", pkg)
fw_dev = create("SDK fw device", "SDK_FW_TOKEN")
code, d = rest("POST", "/api/device", {"id": {"entityType": "DEVICE", "id": fw_dev}, "name": "SDK fw device",
                                      "firmwareId": {"entityType": "OTA_PACKAGE", "id": pkg["id"]["id"]}}, JWT)
check("firmware assigned", code == 200, (code, d))
received = []
fw_client = TBDeviceMqttClient(HOST, port=MQTT, username="SDK_FW_TOKEN", chunk_size=4096)
fw_client.set_on_firmware_received_callback(lambda c, data, version: received.append((data, version)))
fw_client.connect(timeout=30)
wait_for(fw_client.is_connected, 15)
fw_client.get_firmware_update()
check("firmware downloaded in chunks and verified (MQTT)", wait_for(lambda: received, 30) and received[0] == (FW, "2.0"),
      [(len(x[0]), x[1]) for x in received])
fw_client.disconnect()

# --- provisioning over MQTT 3.1.1 -----------------------------------------------------------
prof = {
    "name": "SDK provisioned",
    "provisionType": "ALLOW_CREATE_NEW_DEVICES",
    "provisionDeviceKey": "sdk-key",
    "profileData": {"provisionConfiguration": {"type": "ALLOW_CREATE_NEW_DEVICES", "provisionDeviceSecret": "sdk-secret"}},
}
code, _ = rest("POST", "/api/deviceProfile", prof, JWT)
assert code == 200
creds = TBDeviceMqttClient.provision(HOST, "sdk-key", "sdk-secret", port=MQTT, device_name="SDK provisioned 1")
check("provisioning succeeds", creds.get("status") == "SUCCESS" and creds.get("credentialsType") == "ACCESS_TOKEN", creds)
prov = TBDeviceMqttClient(HOST, port=MQTT, username=creds["credentialsValue"])
prov.connect(timeout=30)
check("the provisioned device connects and sends", prov.send_telemetry({"p": 1}).get() == TBPublishInfo.TB_ERR_SUCCESS)
prov.disconnect()

# --- gateway ---------------------------------------------------------------------------------
create("SDK gateway", "SDK_GW_TOKEN", {"additionalInfo": {"gateway": True}})
gw = TBGatewayMqttClient(HOST, port=MQTT, username="SDK_GW_TOKEN")
gw.connect(timeout=30)
check("gateway connect and rate limits received", wait_for(gw.is_connected, 15))
gw.gw_connect_device("SDK child", "SDK sensors")
check("gateway telemetry", gw.gw_send_telemetry("SDK child", {"ts": int(time.time() * 1000), "values": {"level": 3}}).get() == TBPublishInfo.TB_ERR_SUCCESS)
check("gateway attributes", gw.gw_send_attributes("SDK child", {"model": "G1"}).get() == TBPublishInfo.TB_ERR_SUCCESS)
_, child = rest("GET", "/api/tenant/devices?deviceName=SDK%20child", None, JWT)
check("child created with its profile", child.get("type") == "SDK sensors", child)
child_id = child["id"]["id"]
check("child telemetry stored", wait_for(lambda: latest(child_id, "level").get("level", [{}])[0].get("value") == "3"))

gw_got = {}
gw_ev = threading.Event()


def on_gw_attrs(result, exception=None):
    gw_got["r"] = result
    gw_ev.set()


gw.gw_request_client_attributes("SDK child", ["model"], on_gw_attrs)
check("gateway attribute request", gw_ev.wait(10) and gw_got["r"].get("value") == "G1", gw_got)

gw_pushed = []
gw.gw_subscribe_to_all_attributes(lambda result, *args: gw_pushed.append(result))
time.sleep(0.5)
rest("POST", f"/api/plugins/telemetry/{child_id}/SHARED_SCOPE", {"setpoint": 5}, JWT)
check("gateway shared attribute push", wait_for(lambda: any(p.get("data", {}).get("setpoint") == 5 for p in gw_pushed)), gw_pushed)


def on_gw_rpc(gateway, request):
    gateway.gw_send_rpc_reply(request["device"], request["data"]["id"], {"done": request["data"]["method"]})


gw.gw_set_server_side_rpc_request_handler(on_gw_rpc)
time.sleep(0.3)
code, answer = rest("POST", f"/api/plugins/rpc/twoway/{child_id}", {"method": "reboot", "params": {}}, JWT)
check("gateway RPC answered", code == 200 and answer == {"done": "reboot"}, (code, answer))
gw.gw_disconnect_device("SDK child")
gw.disconnect()

# --- device over HTTP --------------------------------------------------------------------------
http_id = create("SDK http", "SDK_HTTP_TOKEN")
hd = TBHTTPDevice(BASE, "SDK_HTTP_TOKEN")
check("http connect ({} probe)", hd.connect())
hd.send_telemetry({"volts": 230}, queued=False)
check("http telemetry stored", wait_for(lambda: latest(http_id, "volts").get("volts", [{}])[0].get("value") == "230"))
hd.send_attributes({"serial": "S-1"})
attrs = hd.request_attributes(["serial"], None)
check("http attribute request (SDK's unknown params: all)", attrs.get("client", {}).get("serial") == "S-1", attrs)
http_updates = []
hd.subscribe("attributes", lambda data: http_updates.append(data))
time.sleep(0.5)
rest("POST", f"/api/plugins/telemetry/{http_id}/SHARED_SCOPE", {"mode": "eco"}, JWT)
check("http attribute long poll", wait_for(lambda: any(u.get("mode") == "eco" for u in http_updates)), http_updates)
hd.unsubscribe("attributes")
answer = hd.send_rpc("getTime")
check("http client-side getTime answered", "GMT+0000" in str(answer.get("time")), answer)

# OTA over HTTP: the SDK's chunked download (it asks for one chunk past the end, which is empty).
rest("POST", "/api/device", {"id": {"entityType": "DEVICE", "id": http_id}, "name": "SDK http",
                            "firmwareId": {"entityType": "OTA_PACKAGE", "id": pkg["id"]["id"]}}, JWT)
hd.chunk_size = 3000
hd.get_firmware_update()
with open("sdk-fw", "rb") as f:
    check("firmware downloaded in chunks and stored (HTTP)", f.read() == FW)
print("ALL OK", flush=True)
