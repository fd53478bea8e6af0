import "./style.css";
import { boot } from "./app";

boot(document.getElementById("app")!);
