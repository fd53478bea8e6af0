import { describe, expect, it } from "vitest";
import { guardLanguage, usableLanguage } from "./locale";

describe("locale guard", () => {
  it("keeps a real language and replaces the POSIX one", () => {
    expect(usableLanguage("de-DE")).toBe("de-DE");
    expect(usableLanguage("C")).toBe("en-US");
    expect(usableLanguage("")).toBe("en-US");
    expect(usableLanguage(undefined)).toBe("en-US");
    expect(() => new Intl.NumberFormat("C")).toThrow(RangeError);
  });

  it("patches a navigator whose language Intl refuses, and leaves a good one alone", () => {
    const bad = { language: "C", languages: ["C"] } as unknown as Navigator;
    expect(guardLanguage(bad)).toBe(true);
    expect(bad.language).toBe("en-US");
    expect(bad.languages).toEqual(["en-US"]);
    expect(() => new Intl.NumberFormat(bad.language)).not.toThrow();
    const good = { language: "fr-FR", languages: ["fr-FR"] } as unknown as Navigator;
    expect(guardLanguage(good)).toBe(false);
    expect(good.language).toBe("fr-FR");
  });
});
