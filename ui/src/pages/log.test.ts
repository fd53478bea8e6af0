import { describe, expect, it } from "vitest";
import { Store } from "../store";
import { byTestId, fakeApi, flush } from "../test/fake-api";
import { fx } from "../test/fixtures";
import { eventText, filterEvents, mountLog } from "./log";

describe("Log", () => {
  it("lists the log and live events, newest first, with filters", async () => {
    const { api } = fakeApi();
    const store = new Store();
    const root = document.createElement("div");
    document.body.replaceChildren(root);
    mountLog(root, { api, store, charts: false });
    await flush();
    const rows = () => [...root.querySelectorAll<HTMLElement>('[data-testid="log-row"]')];
    expect(rows().length).toBe(fx.log().length);
    store.addEvent({ event: "error", message: "disk full" });
    expect(rows().length).toBe(fx.log().length + 1);
    expect(rows()[0].dataset.kind).toBe("error");
    const kind = byTestId(root, "log-kind") as HTMLSelectElement;
    kind.value = "joined";
    kind.dispatchEvent(new Event("change"));
    expect(rows().map((r) => r.dataset.kind)).toEqual(["joined"]);
    kind.value = "";
    kind.dispatchEvent(new Event("change"));
    const search = byTestId(root, "log-search") as HTMLInputElement;
    search.value = "DISK";
    search.dispatchEvent(new Event("input"));
    expect(rows().length).toBe(1);
    expect(rows()[0].textContent).toContain("disk full");
  });

  it("describes events in words", () => {
    const [first] = fx.log();
    expect(eventText(first)).toMatch(/^Resumed: /);
    expect(eventText({ event: "joined", id: "x", uids: ["a", "b"], at: 0 })).toBe("Joined x: 2 experts (a, b)");
    expect(filterEvents(fx.log(), "left", "")).toEqual([]);
  });
});
