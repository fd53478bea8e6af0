// first: uPlot reads navigator.language while its module loads (see locale.ts)
import "./locale";
import "./style.css";
import { boot } from "./app";

boot(document.getElementById("app")!);
