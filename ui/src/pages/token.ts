// The screen shown in a browser without a token (or after the node refused it).

import { h } from "../dom";

export function mountTokenScreen(root: HTMLElement, onToken: (token: string) => void, problem?: string): void {
  const input = h("input", {
    id: "token-input",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    "data-testid": "token-input",
    required: true,
    "aria-describedby": "token-help",
  });
  const err = h("p", { class: "error", role: "alert", hidden: !problem }, problem ?? "");
  const form = h(
    "form",
    {
      class: "token-form",
      onsubmit: (e: Event) => {
        e.preventDefault();
        const t = input.value.trim();
        if (!t) {
          err.textContent = "Paste the token first.";
          err.hidden = false;
          input.focus();
          return;
        }
        onToken(t);
      },
    },
    h("label", { for: "token-input" }, "API token"),
    input,
    h("button", { type: "submit", class: "primary", "data-testid": "token-submit" }, "Open the dashboard"),
  );
  root.replaceChildren(
    h(
      "main",
      { class: "token-screen", id: "main" },
      h("h1", null, "Apiary"),
      h(
        "div",
        { id: "token-help" },
        h("p", null, "This dashboard talks to the node's local API, which needs the node's token."),
        h(
          "p",
          null,
          "The node keeps it in the file ",
          h("code", null, "<data dir>/api-token"),
          ", for example ",
          h("code", null, "~/.local/share/apiary/api-token"),
          " on Linux. Show it with ",
          h("code", null, "cat ~/.local/share/apiary/api-token"),
          " and paste it below, or open the dashboard as ",
          h("code", null, "http://127.0.0.1:7787/#token=<token>"),
          ".",
        ),
        h("p", { class: "muted small" }, "The token is kept in this tab only (session storage) and removed from the address bar."),
      ),
      err,
      form,
    ),
  );
  input.focus();
}
