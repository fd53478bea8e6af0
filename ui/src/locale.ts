// WebKitGTK reports the POSIX locale as `navigator.language` ("C" when LANG is unset or C: minimal
// systems, services, test sessions). "C" is not a BCP 47 tag and `Intl` throws on it, and uPlot builds
// an `Intl.NumberFormat` from `navigator.language` while its module loads, which would stop the whole
// dashboard before it renders. This module is imported first (main.ts) and replaces a language `Intl`
// refuses with "en-US".

/** `lang` if `Intl` accepts it, else "en-US". */
export function usableLanguage(lang: string | undefined | null): string {
  if (!lang) return "en-US";
  try {
    new Intl.NumberFormat(lang);
    return lang;
  } catch {
    return "en-US";
  }
}

/** Makes `nav.language` (and `languages`) usable; returns whether it had to. */
export function guardLanguage(nav: Navigator = navigator): boolean {
  const lang = usableLanguage(nav.language);
  if (lang === nav.language) return false;
  const languages = (nav.languages ?? []).map(usableLanguage);
  Object.defineProperty(nav, "language", { configurable: true, get: () => lang });
  Object.defineProperty(nav, "languages", { configurable: true, get: () => (languages.length ? languages : [lang]) });
  return true;
}

if (typeof navigator !== "undefined") guardLanguage();
